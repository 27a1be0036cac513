"""``rule.prepare()``: the user's own ``loss.backward(); optimizer.step()`` performs exactly the
update of ``rule.train_step``, for every rule whose update autograd can express; under
``DistributedDataParallel`` (gloo) two processes of batch b equal one of batch 2b; inside a
Lightning module it equals the own loop."""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.rules import RuleContext, RuleError, build_rule, rule_options_class

from conftest import assert_rel_close

CLASSES = 5


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU()),
                         nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, CLASSES))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="cnn", width=4, hidden=[16]), (1, 8, 8), CLASSES)


def batches(shape: tuple[int, ...], count: int = 3, n: int = 7, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for _ in range(count)]


def make(name: str, model: nn.Module, shape: tuple[int, ...], **options):
    rule = build_rule(name, rule_options_class(name)(**options), model,
                      RuleContext(num_classes=CLASSES, input_shape=shape, seed=3))
    params = list({id(p): p for p in (*rule.model.parameters(), *rule.parameters())}.values())
    return rule, params


def train(name: str, factory, shape, prepared: bool, labels: bool = False, **options) -> list[torch.Tensor]:
    """Parameters after 3 steps of ``train_step``, or of the own loop on ``rule.prepare()``."""
    rule, params = make(name, factory(), shape, **options)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    net = rule.prepare() if prepared else None
    for i, (x, y) in enumerate(batches(shape)):
        torch.manual_seed(10 + i)  # the same probes (trace_bp) and redrawn signs (brsf) in both loops
        if prepared:
            loss = nn.functional.cross_entropy(net(x, y) if labels else net(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            rule.train_step(x, y, optimizer)
    return [p.detach().clone() for p in params]


CASES = [  # (rule, model, input shape, options)
    ("dfa", mlp, (3, 4), {}), ("bdfa", mlp, (3, 4), {}), ("sdfa", mlp, (3, 4), {}),
    ("dfa", mlp, (3, 4), {"bp_units": ["0"]}),  # hybrid: unit 0 by BP inside unit 1's segment
    ("dfa", cnn, (1, 8, 8), {"granularity": "layer"}), ("lra", mlp, (3, 4), {}),
    ("lra", mlp, (3, 4), {"error_update": "product", "weight_update": "gradient"}),
    ("rec_lra", cnn, (1, 8, 8), {"granularity": "layer"}), ("shallow", mlp, (3, 4), {}),
    ("bp", cnn, (1, 8, 8), {}), ("trace_bp", cnn, (1, 8, 8), {"keep_first_exact": False, "probes": 3}),
    ("fa", mlp, (3, 4), {}), ("usf", mlp, (3, 4), {}), ("brsf", mlp, (3, 4), {}), ("frsf", mlp, (3, 4), {}),
    ("kp", mlp, (3, 4), {}),
]


@pytest.mark.parametrize("name,factory,shape,options", CASES,
                         ids=[f"{c[0]}-{c[1].__name__}-{'-'.join(c[3]) or 'default'}" for c in CASES])
def test_own_backward_equals_train_step(name, factory, shape, options):
    initial = [p.detach().clone() for p in make(name, factory(), shape, **options)[1]]
    want = train(name, factory, shape, prepared=False, **options)
    got = train(name, factory, shape, prepared=True, **options)
    assert any((w - i).abs().max() > 0 for w, i in zip(want, initial)), "the rule must have moved its parameters"
    for k, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(g, w, 1e-5, f"{name} parameter {k}")


def test_dfa_alignment_reads_the_labels_given_to_the_prepared_forward():
    want = train("dfa", mlp, (3, 4), prepared=False, align_every=1)
    got = train("dfa", mlp, (3, 4), prepared=True, labels=True, align_every=1)
    for g, w in zip(got, want):
        assert_rel_close(g, w, 1e-5)
    rule, _ = make("dfa", mlp(), (3, 4), align_every=1)
    x, y = batches((3, 4))[0]
    with pytest.raises(RuleError, match=r"align_every .* call net\(x, y\)"):
        nn.functional.cross_entropy(rule.prepare()(x), y).backward()


@pytest.mark.parametrize("name", ["drtp", "tpsgd"])
def test_forward_only_rules_refuse_to_be_prepared(name):
    rule, _ = make(name, mlp(), (3, 4))
    with pytest.raises(RuleError, match=r"cannot be prepared .* rule.train_step\(x, y, optimizer\)"):
        rule.prepare()


def test_prepared_eval_is_the_rules_evaluation_and_train_eval_set_the_models_mode():
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5)), nn.Linear(16, CLASSES))
    rule, _ = make("dfa", model, (3, 4))
    net = rule.prepare()
    x = torch.randn(9, 3, 4)
    net.eval()
    assert not model.training and not any(m.training for m in model.modules())
    out = net(x)
    assert not out.requires_grad or out.grad_fn is None or "Inject" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, net(x))  # dropout off: deterministic
    rule.train()
    assert model.training and all(m.training for m in model.modules())
    rule.eval()
    assert not any(m.training for m in model.modules())


def test_prepared_parameters_hold_the_rules_learned_state():
    rule, _ = make("lra", mlp(), (3, 4))
    net = rule.prepare()
    held = {id(p) for p in net.parameters()}
    assert all(id(p) in held for p in rule.error_maps.parameters()) and all(id(p) in held for p in rule.model.parameters())


def test_a_compiled_prepared_rule_trains_as_the_eager_one():
    """``torch.compile(net)``: the units compile, the injection is a graph break."""
    results = []
    for compiled in (False, True):
        rule, _ = make("dfa", mlp(), (3, 4))
        net = rule.prepare()
        run = torch.compile(net) if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for x, y in batches((3, 4)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(run(x), y).backward()
            optimizer.step()
        results.append([p.detach().clone() for p in net.parameters()])
    for g, w in zip(*results):
        assert_rel_close(g, w, 1e-5)


# --- DistributedDataParallel, gloo ---------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, name: str, options: dict, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rule, _ = make(name, mlp(), (3, 4), **options)
    net = nn.parallel.DistributedDataParallel(rule.prepare())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches((3, 4), n=8):
        loss = nn.functional.cross_entropy(net(x[rank::world]), y[rank::world])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if rank == 0:
        torch.save([p.detach() for p in net.module.parameters()], out)
    dist.destroy_process_group()


DDP_RULES = [("dfa", {}), ("bdfa", {}), ("lra", {}), ("fa", {})]  # lra: with its norm-ball, after the average


@pytest.mark.parametrize("name,options", DDP_RULES, ids=[n for n, _ in DDP_RULES])
def test_ddp_of_two_processes_equals_one_with_the_doubled_batch(tmp_path, name, options):
    out = tmp_path / "two.pt"
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_ddp_worker, args=(2, port, name, options, str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out)
    rule, params = make(name, mlp(), (3, 4), **options)
    net = rule.prepare()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches((3, 4), n=8):
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for k, (g, w) in enumerate(zip(got, net.parameters())):
        assert_rel_close(g, w.detach(), 1e-5, f"{name} parameter {k}")


# --- Lightning -----------------------------------------------------------------------------------


def test_dfa_in_a_lightning_module_equals_the_own_loop():
    lightning = pytest.importorskip("lightning.pytorch", reason="pip install -e '.[dev]' brings lightning")

    class DFAModule(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            rule, _ = make("dfa", mlp(), (3, 4))
            self.net = rule.prepare()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)

    data = batches((3, 4))  # already batched: the loader passes them on as they are
    module = DFAModule()
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    want = train("dfa", mlp, (3, 4), prepared=True)
    for g, w in zip(module.net.parameters(), want):
        assert_rel_close(g.detach(), w, 1e-5)
    assert any((w - p).abs().max() > 0 for w, p in zip(want, mlp().parameters()))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
