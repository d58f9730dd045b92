"""A checkpoint written block by block, with a journal a rerun resumes from.

The driver (quantkit.pipeline) hands each finished decoder block to
StreamingCheckpoint.block_done, whose writer thread, while the driver goes on
with the next block,

    writes the block's tensors (packed quantized linears, float norms and
    biases) as one safetensors part in the temporary folder,
    saves what flows into the next block (the calibration batches and the
    held-out streams: quantkit.pipeline.Streams) as quantkit_journal/streams-*.pt;

then (at the next block_done, or at flush) the block is recorded in
quantkit_journal/journal.json: its report rows, its time and memory, and the
run's fingerprint. Each file is written beside its final name and renamed over
it, the journal last, so a kill at any moment leaves the journal naming only
complete files (and loses at most the block being written). The
quantized weights are not held to the end, and a lazy model's block is
released (quantkit.models.lazy).

A rerun of the same command finds the dead run's temporary folder
(quantkit.checkpoint.output keeps it), compares fingerprints, and continues at
the first block the journal does not hold: the tensors written are the same as
an uninterrupted run's, bit for bit, because the next block starts from the
very tensors the dead run saved. A different model, recipe, calibration data,
device, number of processes or quantkit/torch version starts over and says
which differs.

finish() writes the embeddings, the final norm and the output head (one
module at a time, a lazy model's read from its files), names the parts as
shards (model-0000i-of-0000n.safetensors and an index; one model.safetensors
when the whole is small), adds config, tokenizer, recipe and report, and
renames the folder into place (quantkit.checkpoint.output).

Several processes (quantkit.distributed): every rank saves its own share of the
streams; rank 0 writes the parts and the journal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.checkpoint.output import JOURNAL_DIR, check_output, commit_output, dead_temporaries, is_resumable, \
    new_temporary
from quantkit.checkpoint.report import linear_row
from quantkit.checkpoint.writer import check_finite_state, packed_tensors, quantized_config, save_part, \
    write_folder_files, write_index
from quantkit.formats import ActSpec
from quantkit.forwards import BlockInput
from quantkit.models import LoadedModel
from quantkit.models.families import checkpoint_name
from quantkit.models.lazy import tensor_nbytes
from quantkit.pipeline import LinearResult, ResumePoint, Streams

log = logging.getLogger("quantkit")

JOURNAL = "journal.json"
ONE_FILE_BYTES = 512 * 2**20  # a checkpoint this small is written as one model.safetensors


def source_fingerprint(source: str) -> dict:
    """What identifies a model's files without reading their weights: a folder's config and its
    weight files' names, sizes and safetensors headers; a single file's size and first 16 MiB."""
    path = Path(source)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            if f.suffix == ".json":
                h.update(f.name.encode() + f.read_bytes())
            elif f.suffix in (".safetensors", ".bin"):
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    n = int.from_bytes(head, "little") if len(head) == 8 and f.suffix == ".safetensors" else 0
                    h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(n, 100 << 20)))
    elif path.is_file():
        with open(path, "rb") as fh:
            h.update(str(path.stat().st_size).encode() + fh.read(16 << 20))
    else:
        h.update(source.encode())  # a hub id
    return {"source": source, "files": h.hexdigest()}


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 of tensors' bytes (token ids): what the calibration and held-out data were."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode() + t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _to_plain(items: list[BlockInput]) -> list[dict]:
    return [{"hidden": b.hidden, "kwargs": b.kwargs, "by_type": b.by_type} for b in items]


def _from_plain(items: list[dict]) -> list[BlockInput]:
    return [BlockInput(b["hidden"], b["kwargs"], b["by_type"]) for b in items]


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class StreamingCheckpoint:
    """The pipeline's BlockSink for `quantkit quantize`: see the module docstring.

    fingerprint: what must match for a rerun to resume (JSON-able). rank / world: this
    process among several (quantkit.distributed); only rank 0 writes weights and journal;
    barrier() waits for every rank, share(obj) returns rank 0's obj on every rank.
    """

    def __init__(self, out: str | os.PathLike, force: bool, inputs, fingerprint: dict, loaded: LoadedModel,
                 activations: ActSpec | None, device, rank: int = 0, world: int = 1, barrier=None,
                 share=None) -> None:
        self.out = check_output(out, force, inputs, keep_resumable=True) if rank == 0 else \
            Path(out).expanduser().resolve()
        self.loaded, self.family, self.activations = loaded, loaded.family, activations
        self.fingerprint, self.device, self.rank, self.world = fingerprint, torch.device(device), rank, world
        self.journal = {"fingerprint": fingerprint, "done": []}
        self.resume: ResumePoint | None = None
        self.note: str | None = None
        self.barrier = barrier or (lambda: None)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-writer")
        self._pending: tuple[Future, dict] | None = None  # the block being written, and its journal entry
        adopt = self._find_resumable() if rank == 0 else None
        self.tmp = new_temporary(self.out, adopt) if rank == 0 else None
        if rank == 0:
            (self.tmp / JOURNAL_DIR).mkdir(exist_ok=True)
            if adopt is None:
                _atomic_json(self.tmp / JOURNAL_DIR / JOURNAL, self.journal)
        # every rank reads and writes its streams in rank 0's folder (one machine, one disk)
        self.folder = Path(share(str(self.tmp) if rank == 0 else None)) if share else self.tmp
        if share is not None:
            self.journal = share(self.journal if rank == 0 else None)

    # ------------------------------------------------------------------ resume

    def _find_resumable(self) -> Path | None:
        for folder in reversed(dead_temporaries(self.out)):
            if not is_resumable(folder):
                continue
            try:
                journal = json.loads((folder / JOURNAL_DIR / JOURNAL).read_text("utf-8"))
                before = journal["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                before, journal = None, None
            differs = ["the journal is unreadable"] if before is None else \
                [k for k in sorted(set(before) | set(self.fingerprint)) if before.get(k) != self.fingerprint.get(k)]
            if differs or not journal["done"]:
                why = f"its {', '.join(differs)} differ" if differs else "no block was finished"
                log.warning(f"starting over: an interrupted run on {self.out} was found in {folder}, but {why}; removed it")
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self.journal = journal
            return folder
        return None

    def resume_point(self) -> ResumePoint | None:
        """Where to continue (None: from the start), with this rank's saved streams."""
        done = self.journal["done"]
        if not done:
            return None
        last = done[-1]["block"]
        state = torch.load(self.streams_path(last), map_location=self.device, weights_only=True)
        streams = Streams(_from_plain(state["inputs"]), _from_plain(state["held_float"]), _from_plain(state["held_quant"]))
        return ResumePoint(last + 1, streams)

    def streams_path(self, block: int) -> Path:
        """This rank's streams as they leave `block`: a file per block, so that a kill between
        saving them and the journal's update leaves the journal's own block's file in place."""
        return self.folder / JOURNAL_DIR / f"streams-r{self.rank}-b{block:05d}.pt"

    # ------------------------------------------------------------------ the pipeline's sink

    def block_done(self, index: int, block: torch.nn.Module, results: list[LinearResult],
                   input_scales: dict[str, torch.Tensor], streams: Streams, figures: dict) -> None:
        """Hand block `index`'s files to the writer thread; the journal names the block once they are
        on disk (at the next block_done, or at flush), so writing overlaps the next block's work."""
        prefix = f"{self.family.blocks}.{index}"
        rows = [linear_row(r, unpacked=self.activations is not None) for r in results]
        state, part = None, None
        if self.rank == 0:
            quantized = {r.name for r in results}
            state = {}
            for key, t in block.state_dict().items():
                name = f"{prefix}.{key}"
                if not (key.endswith(".weight") and name[: -len(".weight")] in quantized):
                    state[name] = t.detach()
            for r in results:
                state.update(packed_tensors(r.name, r.weight, self.activations, input_scales.get(r.name)))
            state = {checkpoint_name(self.family, k): t for k, t in state.items()}
            check_finite_state(state)
            part = f"part-{index:05d}.safetensors"
        # the streams are not changed in place by the next block (its outputs are new tensors), so the
        # writer may read them while the pipeline goes on
        plain = {"inputs": _to_plain(streams.inputs), "held_float": _to_plain(streams.held_float),
                 "held_quant": _to_plain(streams.held_quant)}
        entry = {"block": index, "part": part, "rows": rows, "figures": figures,
                 "g_idx": any(r.weight.g_idx is not None for r in results)}
        self.flush()  # the block before: on disk and journaled (at most one block is in the writer's hands)
        self._pending = (self._writer.submit(self._write_block, index, state, part, plain), entry)

    def _write_block(self, index: int, state: dict | None, part: str | None, plain: dict) -> None:
        if state is not None:
            save_part(state, self.tmp / f"{part}.new")
            os.replace(self.tmp / f"{part}.new", self.tmp / part)
        path = self.streams_path(index)
        torch.save(plain, path.with_name(path.name + ".new"))
        os.replace(path.with_name(path.name + ".new"), path)

    def flush(self) -> None:
        """Wait for the block in the writer's hands and name it in the journal (every rank calls
        this at the same points: it waits for the others)."""
        if self._pending is None:
            return
        future, entry = self._pending
        self._pending = None
        future.result()  # the writer's error, if any, is raised here
        self.barrier()  # every rank's streams are saved before the journal names the block
        previous = self.journal["done"][-1]["block"] if self.journal["done"] else None
        self.journal["done"].append(entry)
        if self.rank == 0:
            _atomic_json(self.tmp / JOURNAL_DIR / JOURNAL, self.journal)
        self.barrier()
        if previous is not None:
            self.streams_path(previous).unlink(missing_ok=True)

    # ------------------------------------------------------------------ what the run learned

    @property
    def rows(self) -> list[dict]:
        return [r for d in self.journal["done"] for r in d["rows"]]

    @property
    def blocks(self) -> list[dict]:
        return [d["figures"] for d in self.journal["done"]]

    # ------------------------------------------------------------------ the end

    def _outer_parts(self) -> list[str]:
        """The tensors outside the decoder blocks (embeddings, final norm, output head), one
        module at a time (a lazy model's read from its files and released), one part each."""
        model, family = self.loaded.model, self.family
        tied = getattr(model.config, "tie_word_embeddings", False)
        owners: dict[str, list[str]] = {}
        for key in model.state_dict(keep_vars=True):
            if key.startswith(f"{family.blocks}."):
                continue
            if tied and key == f"{family.lm_head}.weight":
                continue  # tied to the input embedding: written once, re-tied by transformers at load
            owners.setdefault(key.rpartition(".")[0], []).append(key)
        parts = []
        for k, (module, keys) in enumerate(owners.items()):
            self.loaded.materialize(module)
            everything = model.state_dict()
            state = {checkpoint_name(family, key): everything[key].detach() for key in keys}
            check_finite_state(state)
            part = f"part-outer-{k:03d}.safetensors"
            save_part(state, self.tmp / part)
            parts.append(part)
            self.loaded.release(module)
        return parts

    def finish(self, tokenizer, specs: dict, float_linears: list[str], actorder: str | None,
               recipe_yaml: str, report: dict, extra_files: dict[str, bytes] | None = None,
               transforms: dict | None = None) -> Path:
        """Write what is left, name the shards and swap the folder into place (rank 0). The
        journal and the block parts stay until everything else is written, so an interruption
        in here still leaves a run to resume."""
        if self._pending is not None:
            raise RuntimeError("internal: StreamingCheckpoint.finish before flush (every rank flushes)")
        self._writer.shutdown(wait=True)
        parts = [d["part"] for d in self.journal["done"]] + self._outer_parts()
        total = sum((self.tmp / p).stat().st_size for p in parts)
        if total <= ONE_FILE_BYTES or len(parts) == 1:
            merged = {}
            for p in parts:
                with safe_open(str(self.tmp / p), "pt") as f:
                    merged.update({k: f.get_tensor(k) for k in f.keys()})
            save_part(merged, self.tmp / "model.safetensors")
            del merged
            names = {}
        else:
            names, index, size = {}, {}, 0
            for i, p in enumerate(parts, 1):
                names[p] = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                with safe_open(str(self.tmp / p), "pt") as f:
                    for k in f.keys():
                        index[k] = names[p]
                        sl = f.get_slice(k)
                        size += tensor_nbytes(sl.get_dtype(), sl.get_shape())
            write_index(self.tmp, index, size)
        files = list(names.values()) or ["model.safetensors"]
        if any(d["g_idx"] for d in self.journal["done"]):
            actorder = "group"  # act-order with g_idx is compressed-tensors' actorder "group"
        config = quantized_config(self.loaded.model.config, specs, float_linears, actorder, self.activations, transforms)
        sizes = {f: (self.tmp / p).stat().st_size for p, f in names.items()}
        write_folder_files(self.tmp, config, getattr(self.loaded.model, "generation_config", None), tokenizer,
                           recipe_yaml, extra_files, report, files, sizes)
        for p in parts:
            if p in names:
                os.replace(self.tmp / p, self.tmp / names[p])
            else:
                (self.tmp / p).unlink()
        shutil.rmtree(self.tmp / JOURNAL_DIR)
        commit_output(self.tmp, self.out)
        return self.out

    def abandon(self, keep: bool) -> None:
        """The run failed: keep the partial folder for a rerun to resume (`keep`, and a block is
        finished), saying where; else remove it."""
        pending, self._pending = self._pending, None
        if pending is not None:  # let the writer finish before anything is kept or removed
            done = pending[0].exception() is None
            if done and keep and self.world == 1 and self.rank == 0:  # alone: no other rank's streams to wait for
                self.journal["done"].append(pending[1])
                _atomic_json(self.tmp / JOURNAL_DIR / JOURNAL, self.journal)
        self._writer.shutdown(wait=True)
        if self.rank != 0 or self.tmp is None or not self.tmp.exists():
            return
        if keep and self.journal["done"]:
            log.warning(f"kept {len(self.journal['done'])} finished blocks in {self.tmp}: run the same command "
                        f"again to resume, or delete that folder")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

