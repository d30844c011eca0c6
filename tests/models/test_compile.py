"""torch.compile traces a GSPN model whole (the gspn_mix custom op, the recomputing mixer) and matches eager."""

import torch

from gspn_gen.models import build_model


def test_compiled_gspn_model_matches_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = build_model("GSPN-T/2", depth=2, input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.0).train()
    model.blocks[1].mixer.recompute = True                  # one plain mixer, one recomputing in backward
    with torch.no_grad():
        for p in model.parameters():                        # away from the zero init, so every path counts
            p.add_(torch.randn_like(p), alpha=0.05)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 3, 9])

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(x, t, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = run(model)
    # fullgraph: any graph break is an error; aot_eager: AOTAutograd's joint graph and partitioner
    # (the custom op's fake implementation and autograd formula) without a C++ compiler
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = run(compiled)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_option_compiles_the_model_in_place():
    from gspn_gen.lit import GenerationModule

    plain = GenerationModule(model="GSPN-T/2")
    module = GenerationModule(model="GSPN-T/2", compile=True)
    # nn.Module.compile on each block: __call__ compiled lazily, one graph for all blocks of a structure
    assert all(b._compiled_call_impl is not None for b in module.model.blocks)
    assert all(b._compiled_call_impl is None for b in module.ema.blocks)  # sampling runs the EMA copy eagerly
    assert module.state_dict().keys() == plain.state_dict().keys()  # checkpoints do not change
    assert module.hparams.compile is True                    # a resumed or sampled checkpoint knows it
