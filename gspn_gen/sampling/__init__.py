"""The sampling library: one validated request, one function that runs it.

    from gspn_gen.sampling.request import SampleRequest
    from gspn_gen.sampling.run import sample

    sample(SampleRequest(ckpt="runs/demo/checkpoints/last.ckpt", num_samples=1000, cfg_scale=1.5, steps=25,
                         out="samples.npz"))

- request.py  `SampleRequest`: every value validated there, once (the model's side in `SampleRequest.check`)
- run.py      `sample(request, module=None)`: a class grid, a resumable sharded .npz, or images in memory
- shards.py   the shards of a .npz in OUT.parts/: manifest, checks, assembly
- draw.py     drawing from a module: guided sampling, decoding, grids, image and batch files (the
              training module draws its grids with it, so it imports nothing that builds a module)

`sample.py` (gspn_gen.sample_cli), the guidance sweep (gspn_gen.sweep), the FID callback and the
distillation benchmark all go through `sample`. Submodules are imported by name: this file imports none,
so the training module can use draw.py while run.py builds training modules from checkpoints.
"""
