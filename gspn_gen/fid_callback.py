"""FID during training: a Lightning callback that scores EMA samples against cached reference statistics.

Every `every_n_steps` optimizer steps it draws `num_samples` images (classes balanced, sample i from the
noise of (seed, i), so every evaluation sees the same noise and only the weights change) with the EMA
weights through the sampling library (a `SampleRequest`, checked when the callback is built and against
the model at fit start), scores them with fid_eval, and logs `eval/fid` (and
`eval/class_agreement` for the digits extractor; `eval/seconds` and `eval/cpu_seconds`, its wall and
process CPU time) to every logger: TensorBoard and metrics.csv. The reference statistics are computed once (fid_eval's content-hash cache) and kept.

    callbacks:
      - class_path: gspn_gen.fid_callback.FIDCallback
        init_args: {every_n_steps: 400, num_samples: 200, ref: "digits:val", extractor: digits}

It runs on rank 0 only and does not touch the global RNG, so training is the same with or without it.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from gspn_gen.sampling.request import SampleRequest
from gspn_gen.sampling.run import sample


class FIDCallback(L.Callback):
    """Log FID of `num_samples` EMA samples against `ref` every `every_n_steps` steps (and after the last)."""

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 1000,
        ref: str = "digits:val",
        extractor: str = "inception",
        weights: str | None = None,
        metrics: str = "fid",
        cfg_scale: float = 1.0,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        batch_size: int = 250,
        cache_dir: str | None = None,
    ):
        """
        Args:
            every_n_steps: evaluate at every global step that is a multiple of this.
            num_samples: samples per evaluation, classes balanced (sample i has class i mod num_classes).
            ref: reference: digits:val, an ADM reference batch .npz, an image folder or a statistics file.
            extractor: feature network of fid_eval: inception (needs its local weights file) or digits.
            weights: extractor weights file (default: its usual location).
            metrics: comma list of fid_eval metrics to log (fid, sfid, isc, kid, prc).
            cfg_scale: guidance scale of the samples (1 = none).
            steps: sampling steps (default: the process's own).
            sampler: sampler name (default: the process's own).
            seed: noise seed; the same at every evaluation.
            batch_size: samples per forward pass.
            cache_dir: reference statistics cache (default $GSPN_FID_CACHE or ~/.cache/gspn_gen/fid_stats).
        """
        super().__init__()
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("num_samples", num_samples, 2)):
            if value < low:
                raise ValueError(f"FIDCallback {name} must be >= {low}, got {value}")
        try:
            self.request = SampleRequest(num_samples=num_samples, cfg_scale=cfg_scale, steps=steps, sampler=sampler,
                                         seed=seed, batch_size=batch_size)
        except ValueError as e:
            raise ValueError(f"FIDCallback: {e}") from None
        self.every_n_steps, self.num_samples, self.ref, self.metrics = every_n_steps, num_samples, ref, metrics
        self.extractor_name, self.weights, self.cache_dir = extractor, weights, cache_dir
        self._extractor = None
        self._reference = None
        self._last_step = -1
        self._warned = False  # warnings of the comparison (e.g. image sizes differ) are printed once

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Build the extractor (on the module's device) and the reference statistics once, before step 1."""
        if self._reference is not None:
            return
        from fid_eval import FidEvalError, build_extractor
        from fid_eval.evaluation import open_input, parse_metrics
        from fid_eval.inputs import ImageSource
        from fid_eval.stats import cached_stats, stored_stats

        try:
            self.request.check(pl_module)
            metrics = parse_metrics(self.metrics)
            self._extractor = build_extractor(self.extractor_name, self.weights, str(pl_module.device))
            ref = open_input(self.ref)
            if isinstance(ref, ImageSource):
                # An ADM batch's stored statistics serve only when they hold all the metrics need (sFID: mu_s).
                stored = stored_stats(ref) if self.extractor_name == "inception" else None
                only_stored = (stored is not None and set(metrics) <= {"fid", "sfid"}
                               and ("sfid" not in metrics or stored.mu_s is not None))
                ref = stored if only_stored else cached_stats(ref, self._extractor, self.cache_dir, progress=False)
            self._reference = ref
        except (FidEvalError, ValueError) as e:
            raise ValueError(f"FIDCallback: {e}") from None

    def on_train_start(self, trainer, pl_module) -> None:
        # The step training starts at (0, or a resumed run's) was scored before or is the untrained model.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step  # once per optimizer step, also with gradient accumulation
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step and trainer.global_step > 0:
            self._last_step = trainer.global_step
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            # The sharded EMA cannot sample on rank 0 alone; score a checkpoint with fid_eval instead.
            rank_zero_warn("FIDCallback is skipped under FSDP", category=UserWarning)
            return
        if trainer.global_rank == 0:
            values = self.score(pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    @torch.no_grad()
    def score(self, pl_module) -> dict[str, float]:
        """Sample with the EMA weights and score: {"eval/fid": ..., ..., "eval/seconds": ...}."""
        from fid_eval import ArraySource, evaluate
        from fid_eval.evaluation import print_warnings

        start, start_cpu = time.perf_counter(), time.process_time()
        samples = sample(self.request, module=pl_module, verbose=False)
        report = evaluate(ArraySource(samples.images, samples.labels, name="EMA samples"), self._reference,
                          self.metrics, self._extractor, progress=False)
        if not self._warned:
            print_warnings(report, "FIDCallback")
            self._warned = True
        values = {f"eval/{k}": v for k, v in report["metrics"].items()}
        values["eval/seconds"] = time.perf_counter() - start
        values["eval/cpu_seconds"] = time.process_time() - start_cpu  # training waits meanwhile: all of it is ours
        return values
