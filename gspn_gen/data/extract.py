"""Encode an ImageFolder tree (e.g. ImageNet train) to VAE latent shards, on one or many devices.

    python -m gspn_gen.data.extract --images /data/imagenet/train --out /data/in256 \\
        --image-size 256 --vae stabilityai/sd-vae-ft-ema --devices 8

Each image is ADM center-cropped, then it and its horizontal mirror are encoded (posterior mean,
scaled; see gspn_gen.codecs). OUT then holds

    shard-00000.safetensors ...   latents fp16 (n, 2, C, h, w) [image, flip], labels int64 (n,),
                                  indices int64 (n,) (position in the sorted file list); the header
                                  metadata keeps the settings and the shard's unreadable files
    meta.json                     codec spec (with its scale), image size, latent shape, counts,
                                  class names, shard list: all LatentDataModule needs
    report.json                   every unreadable or corrupt image (path + error); they are skipped

Shard s holds the images s*shard_size .. (s+1)*shard_size-1 of the sorted list and is written by
rank s % world_size alone, crash-safe (gspn_gen.fileio), so a finished shard is always complete.
Re-running the same command skips finished shards (resume). Processes come from Lightning
(`--devices`, `--num-nodes`, `--strategy ddp`; SLURM and torchrun work as for training): Lightning
re-launches this command line for the other ranks, so several devices need the CLI, not `extract()`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader

from gspn_gen.codecs import DEFAULT_VAE_SCALE, CodecLoadError, build_codec, sd_vae_spec
from gspn_gen.data.images import ImageFolderDataset
from gspn_gen.data.latents import FORMAT, VERSION
from gspn_gen.fileio import write_bytes, write_json


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


@rank_zero_only
def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ShardPlan:
    """Which dataset indices make up each shard, and the settings a finished shard must match."""

    def __init__(self, dataset: ImageFolderDataset, codec_spec: dict, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.dataset = dataset
        self.shard_size = shard_size
        self.num_shards = -(-len(dataset) // shard_size)
        self.base = {
            "format": FORMAT,
            "version": VERSION,
            "image_size": dataset.image_size,
            "codec": codec_spec,
            "shard_size": shard_size,
        }

    def indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.dataset)))

    def settings(self, shard: int) -> dict:
        """The base settings plus a hash of the shard's (label, file) list."""
        listing = "\n".join(f"{self.dataset.samples[i][1]}\t{self.dataset.samples[i][0]}" for i in self.indices(shard))
        return {**self.base, "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    def finished(self, out: str) -> set[int]:
        """Shards already in `out`; one made with other settings raises ValueError."""
        done = set()
        for shard in range(self.num_shards):
            path = os.path.join(out, shard_name(shard))
            if not os.path.exists(path):
                continue
            found = read_header(path)["settings"]
            wanted = self.settings(shard)
            diff = [f"{k}: {found.get(k)!r} != {wanted[k]!r}" for k in wanted if found.get(k) != wanted[k]]
            if diff:
                raise ValueError(
                    f"{path} was made with other settings ({'; '.join(diff)}): use a new --out directory "
                    "or delete the old shards"
                )
            done.add(shard)
        return done


def read_header(path: str) -> dict:
    """A shard's metadata: settings, count and failed files."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return {"settings": json.loads(meta["settings"]), "count": int(meta["count"]),
                "failed": json.loads(meta["failed"])}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a gspn-gen latent shard (bad header: {err})") from err


class LatentExtractor(L.LightningModule):
    """predict_step encodes a batch; the last batch of a shard writes it. Rank r owns shards s % world == r."""

    def __init__(self, codec, plan: ShardPlan, out: str, batch_size: int, num_workers: int):
        super().__init__()
        self.codec, self.plan, self.out = codec, plan, out
        self.batch_size, self.num_workers = batch_size, num_workers
        self.buffers: dict[int, dict] = {}
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may have no shard left (resume)

    def predict_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        done = self.plan.finished(self.out)
        mine = [s for s in range(self.plan.num_shards) if s % world == rank and s not in done]
        indices = [i for s in mine for i in self.plan.indices(s)]  # shard after shard, in order
        return DataLoader(self.plan.dataset, sampler=indices, batch_size=self.batch_size,
                          num_workers=self.num_workers)

    def on_predict_start(self) -> None:
        self.codec.to(self.device)

    def predict_step(self, batch, batch_idx: int) -> int:
        images, labels, indices, errors = batch  # (B, 3, S, S), (B,), (B,), B strings
        ok = torch.tensor([not e for e in errors], device=images.device)
        latents = torch.zeros(len(indices), 0)
        if ok.any():
            x = images[ok]
            z = self.codec.encode(torch.cat([x, x.flip(-1)]))  # (2n, C, h, w): images, then mirrors
            z = torch.stack(z.chunk(2), dim=1).half().cpu()  # (n, 2, C, h, w)
            latents = torch.zeros(len(indices), *z.shape[1:], dtype=z.dtype)
            latents[ok.cpu()] = z
            for i in (ok.cpu() & ~torch.isfinite(latents).flatten(1).all(1)).nonzero()[:, 0].tolist():
                errors[i] = "non-finite latent (VAE overflow? try --precision 32-true)"
        # A batch may straddle shards: file each row under its own shard.
        labels = labels.tolist()
        for row, (index, err) in enumerate(zip(indices.tolist(), errors)):
            shard = index // self.plan.shard_size
            buf = self.buffers.setdefault(shard, {"rows": [], "labels": [], "indices": [], "failed": [], "seen": 0})
            if err:
                buf["failed"].append({"path": self.plan.dataset.path(index), "index": index, "error": err})
            else:
                buf["rows"].append(latents[row])
                buf["labels"].append(labels[row])
                buf["indices"].append(index)
            buf["seen"] += 1
            if buf["seen"] == len(self.plan.indices(shard)):
                self.write_shard(shard, self.buffers.pop(shard))
        return int(ok.sum())  # (discarded; returning None makes Lightning warn)

    def write_shard(self, shard: int, buf: dict) -> None:
        c, h, w = self.codec.latent_shape(self.plan.dataset.image_size)
        tensors = {
            "latents": torch.stack(buf["rows"]) if buf["rows"] else torch.zeros(0, 2, c, h, w, dtype=torch.float16),
            "labels": torch.tensor(buf["labels"], dtype=torch.int64),
            "indices": torch.tensor(buf["indices"], dtype=torch.int64),
        }
        metadata = {
            "settings": json.dumps(self.plan.settings(shard)),
            "count": str(len(tensors["labels"])),
            "failed": json.dumps(buf["failed"]),
        }
        path = os.path.join(self.out, shard_name(shard))
        data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        write_bytes(path, data)


def write_meta(out: str, plan: ShardPlan, codec) -> dict:
    """After all shards exist: meta.json (for LatentDataModule) and report.json (skipped files)."""
    missing = [shard_name(s) for s in range(plan.num_shards) if not os.path.exists(os.path.join(out, shard_name(s)))]
    if missing:
        raise RuntimeError(f"extraction incomplete, missing {len(missing)} shards in {out}: {missing[:5]}")
    shards, failed = [], []
    class_counts = [0] * len(plan.dataset.classes)
    for s in range(plan.num_shards):
        path = os.path.join(out, shard_name(s))
        header = read_header(path)
        with safe_open(path, framework="pt") as f:
            labels = f.get_tensor("labels")
        for label, n in zip(*torch.unique(labels, return_counts=True)):
            class_counts[int(label)] += int(n)
        shards.append({"file": shard_name(s), "count": header["count"]})
        failed += header["failed"]
    num_latents = sum(s["count"] for s in shards)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "codec": codec.spec,
        "encoding": "posterior mean",
        "image_size": plan.dataset.image_size,
        "latent_shape": list(codec.latent_shape(plan.dataset.image_size)),
        "dtype": "float16",
        "pairs": ["image", "horizontal flip"],
        "num_classes": len(plan.dataset.classes),
        "class_names": plan.dataset.classes,
        "class_counts": class_counts,
        "num_images": len(plan.dataset),
        "num_latents": num_latents,
        "num_failed": len(failed),
        "shard_size": plan.shard_size,
        "shards": shards,
        "images_root": plan.dataset.root,
    }
    write_json(os.path.join(out, "report.json"), {"images_root": plan.dataset.root, "num_failed": len(failed),
                                                  "failed": failed})
    write_json(os.path.join(out, "meta.json"), meta)
    return meta


def check_writable(out: str) -> str:
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"output directory {out!r} is not writable: {err}") from err
    return out


def prepare(images: str, out: str, image_size: int, vae: str, shard_size: int, vae_scale: float | None = None):
    """Validate the arguments and build (codec, plan, out); every rank runs this identically."""
    if image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    dataset = ImageFolderDataset(images, image_size)
    codec = build_codec(sd_vae_spec(vae, vae_scale))
    codec.latent_shape(image_size)  # raises when image_size is not a multiple of the downsample factor
    config_scale = getattr(codec.vae.config, "scaling_factor", None)
    if config_scale is not None and abs(config_scale - codec.scale) > 1e-8:
        say(f"warning: VAE config says scaling_factor={config_scale}, using scale={codec.scale} (--vae-scale)")
    out = check_writable(out)
    return codec, ShardPlan(dataset, codec.spec, shard_size), out


def extract(
    images: str,
    out: str,
    image_size: int,
    vae: str,
    shard_size: int = 1024,
    batch_size: int = 32,
    num_workers: int = 4,
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    vae_scale: float | None = None,
    progress: bool = True,
) -> dict | None:
    """Run the extraction; returns the meta dict on global rank 0 (None on other ranks)."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    codec, plan, out = prepare(images, out, image_size, vae, shard_size, vae_scale)
    todo = plan.num_shards - len(plan.finished(out))  # old shards made otherwise fail here, before launching
    say(f"{len(plan.dataset)} images in {len(plan.dataset.classes)} classes -> {plan.num_shards} shards "
        f"({plan.num_shards - todo} already done) in {out}")
    if todo and rank_zero_only.rank == 0:
        with contextlib.suppress(FileNotFoundError):  # until rewritten, the directory is not a finished set
            os.remove(os.path.join(out, "meta.json"))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # ranks pick whole shards themselves
        default_root_dir=out,
    )
    trainer.predict(LatentExtractor(codec, plan, out, batch_size, num_workers), return_predictions=False)
    # Ranks with no shard left skip the predict loop (and its hooks), so synchronise here.
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    meta = write_meta(out, plan, codec)
    say(f"wrote {meta['num_latents']} latents of shape {meta['latent_shape']} x2 (image, flip) to {out}; "
        f"{meta['num_failed']} unreadable images skipped (listed in report.json)")
    return meta


def parse_devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gspn_gen.data.extract",
        description="Encode an ImageFolder tree (one folder per class) to VAE latent shards for training.",
    )
    p.add_argument("--images", required=True, metavar="DIR", help="image root: one sub-folder per class (ImageNet train layout)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for shards, meta.json and report.json")
    p.add_argument("--image-size", type=int, required=True, metavar="PX", help="center-crop size in pixels, e.g. 256 or 512")
    p.add_argument("--vae", required=True, metavar="ID_OR_DIR", help="diffusers AutoencoderKL: hub id (stabilityai/sd-vae-ft-ema) "
                   "or local directory")
    p.add_argument("--vae-scale", type=float, default=None, metavar="S",
                   help=f"latent scale factor (default {DEFAULT_VAE_SCALE}, SD's)")
    p.add_argument("--shard-size", type=int, default=1024, metavar="N", help="images per shard (default 1024)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per device batch (default 32)")
    p.add_argument("--num-workers", type=int, default=4, metavar="N", help="image decoding workers per device (default 4)")
    p.add_argument("--devices", type=parse_devices, default="auto", metavar="N", help="devices per node: N, list or auto")
    p.add_argument("--num-nodes", type=int, default=1, metavar="M", help="number of nodes (default 1)")
    p.add_argument("--accelerator", default="auto", metavar="NAME", help="auto, cpu or gpu (default auto)")
    p.add_argument("--strategy", default="auto", metavar="NAME", help="Lightning strategy, e.g. ddp (default auto: ddp on >1 device)")
    p.add_argument("--precision", default="32-true", metavar="P", help="Lightning precision: 32-true (default), bf16-mixed, 16-mixed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        extract(
            args.images, args.out, args.image_size, args.vae, shard_size=args.shard_size,
            batch_size=args.batch_size, num_workers=args.num_workers, accelerator=args.accelerator,
            devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
            precision=args.precision, vae_scale=args.vae_scale, progress=not args.no_progress,
        )
    except (ValueError, CodecLoadError, ImportError, MisconfigurationException) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
