"""Units of any model cut from its traced graph: torchvision's zoo, the small ViT and a user's module
with a branch that crosses a cut. Units compose exactly to the model, carry the right tensors, and
every local rule that applies trains on them; the others refuse by name."""

import pytest
import torch
from torch import nn

from trainer.config import ModelConfig, build_section
from trainer.graph_units import UnitEnd
from trainer.models import build_model
from trainer.rules import RuleContext, RuleError, build_rule, rule_options_class
from trainer.units import model_units, run_units

ZOO = [  # (model, input shape, expected note): granularity = "children" picks the main block stack
    (ModelConfig(name="torchvision:vgg11_bn"), (3, 32, 32), "blocks of features"),
    (ModelConfig(name="torchvision:mobilenet_v3_small"), (3, 32, 32), "blocks of features"),
    (ModelConfig(name="torchvision:efficientnet_b0"), (3, 32, 32), "blocks of features"),
    (ModelConfig(name="torchvision:convnext_tiny"), (3, 32, 32), "blocks of features"),
    (ModelConfig(name="torchvision:vit_b_16", kwargs={"image_size": 32}), (3, 32, 32),
     "blocks of encoder.layers"),
    (ModelConfig(name="vit", vit_depth=3, vit_width=32, vit_heads=2, vit_mlp=64), (1, 28, 28), "blocks of encoder.layers"),
    (ModelConfig(name="torchvision:swin_t"), (3, 64, 64), "blocks of features"),
]


@pytest.mark.parametrize("cfg, shape, note", ZOO, ids=[c.name for c, _, _ in ZOO])
def test_zoo_units_compose_exactly_to_the_model(cfg, shape, note):
    model = build_model(cfg, shape, 10).eval()
    x = torch.randn(2, *shape)
    units, said = model_units(model, "children")
    assert note in said
    with torch.no_grad():
        torch.testing.assert_close(run_units([u for _, u in units], x), model(x), rtol=0, atol=0)
    assert {id(p) for _, u in units for p in u.parameters()} == {id(p) for p in model.parameters()}


class Branchy(nn.Module):
    """A user's module: a stem, a branch kept aside, a body, and a concatenation of the two that
    crosses the cut after ``body``."""

    def __init__(self, marked: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU())
        self.branch = nn.Linear(10, 3)
        self.body = nn.Sequential(nn.Linear(10, 8), nn.Tanh())
        self.end = UnitEnd() if marked else nn.Identity()
        self.head = nn.Linear(11, 4)

    def forward(self, x):
        h = self.stem(x)
        side = self.branch(h)
        h = self.end(self.body(h))
        return self.head(torch.cat([h, side], dim=1))


@pytest.mark.parametrize("marked", [False, True], ids=["named cuts", "UnitEnd markers"])
def test_a_branch_crossing_a_cut_is_carried(marked):
    model = Branchy(marked).eval()
    x = torch.randn(5, 1, 3, 4)
    cuts = ["stem"] if marked else ["stem", "body"]
    units, _ = model_units(model, "layer", cuts)
    assert [name for name, _ in units] == ["stem", "end" if marked else "body", "output"]
    state = units[0][1](x)
    assert torch.equal(state, model.stem(x)), "nothing else is needed after the stem"
    state = units[1][1](state)
    h = model.stem(x)
    assert isinstance(state, tuple) and len(state) == 2
    assert torch.equal(state[0], model.body(h)) and torch.equal(state[1], model.branch(h)), "h first, then the branch"
    with torch.no_grad():
        torch.testing.assert_close(units[2][1](state), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("units, message", [
    (["stem", "nope"], "'nope' names no submodule of Branchy"),
    (["branch.weight"], "'branch.weight' names no submodule"),
])
def test_bad_unit_names_are_refused(units, message):
    with pytest.raises(ValueError, match=message):
        model_units(Branchy(), "layer", units)


def test_an_untraceable_forward_says_what_to_do():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if h.sum() > 0 else self.b(-h)

    with pytest.raises(ValueError, match="cannot be traced by torch.fx.*an nn.Sequential whose children are the units"):
        model_units(DataDependent(), "layer", ["a"])


def make_rule(name: str, model: nn.Module, shape, **options):
    opts = build_section(rule_options_class(name), options, f"[rule] (rule {name!r})")
    return build_rule(name, opts, model, RuleContext(num_classes=4, input_shape=shape, seed=1))


LOCAL_RULES = [("dfa", {}), ("bdfa", {"feedback_storage": "seeded"}), ("sdfa", {}), ("drtp", {}),
               ("tpsgd", {}), ("shallow", {})]


CASES = [(rule, model) for rule in LOCAL_RULES for model in ("branchy", "vit")] + \
    [(rule, "mobilenet") for rule in LOCAL_RULES if rule[0] in ("dfa", "drtp")]


@pytest.mark.parametrize("rule, model_name", CASES, ids=[f"{r[0]}-{m}" for r, m in CASES])
def test_local_rules_train_on_cut_units(rule, model_name):
    name, options = rule
    torch.manual_seed(0)
    if model_name == "branchy":
        model, shape, cut = Branchy(), (1, 3, 4), {"units": ["stem", "body"]}
    elif model_name == "vit":
        model = build_model(ModelConfig(name="vit", vit_patch=4, vit_depth=2, vit_width=16, vit_heads=2, vit_mlp=32),
                            (1, 8, 8), 4)
        shape, cut = (1, 8, 8), {"granularity": "children"}
    else:
        model = build_model(ModelConfig(name="torchvision:mobilenet_v3_small"), (1, 16, 16), 4)
        shape, cut = (1, 16, 16), {"units": ["features.3", "features.8"]}
    rule = make_rule(name, model, shape, **options, **cut)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, *shape, generator=gen), torch.arange(16) % 4
    losses = [rule.train_step(x, y, optimizer).loss.item() for _ in range(8)]
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["lra", "rec_lra"])
def test_alignment_rules_name_the_unit_they_cannot_use(name):
    with pytest.raises(RuleError, match=r"cannot find the pre-activation of unit 'stem' \(GraphUnit\)"):
        make_rule(name, Branchy(), (1, 3, 4), units=["stem", "body"])


@pytest.mark.parametrize("builder", ["efficientnet_b0", "convnext_tiny"])  # vgg11_bn (128M parameters): composition only
def test_dfa_trains_the_zoo_cut_into_its_blocks(builder):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=f"torchvision:{builder}"), (3, 32, 32), 4)
    rule = make_rule("dfa", model, (3, 32, 32), granularity="children")
    assert len(rule.units) >= 6 and rule.unit_names[-1] == "output"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.arange(8) % 4
    losses = [rule.train_step(x, y, optimizer).loss.item() for _ in range(6)]
    assert losses[-1] < losses[0], losses


class FunctionalActs(nn.Module):
    """A forward that applies its activations as functions and methods, as pytorch/examples do."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x, attn_mask=None, is_causal=False):  # optional extras, as timm's blocks have
        h = nn.functional.relu(self.fc1(x.flatten(1)))
        h = self.fc2(h).tanh()
        if attn_mask is not None:
            h = h + attn_mask
        return self.fc3(h)


def test_cuts_land_after_the_activation_whether_functional_method_or_module():
    units, _ = model_units(FunctionalActs(), "children")
    x = torch.randn(6, 12)
    h1 = units[0][1](x)
    assert (h1 >= 0).all() and (h1 == 0).any(), "unit 1's output is after its ReLU"
    assert (units[1][1](h1).abs() <= 1).all(), "unit 2's output is after its tanh"
    resnet = build_model(ModelConfig(name="resnet18", cifar_stem=True), (3, 16, 16), 10)
    names = [name for name, _ in model_units(resnet, "children")[0]]
    assert "bn1" not in names and names[:2] == ["conv1", "relu"], "bn1 and the ReLU after it are one cut"


def test_dfa_signal_passes_through_a_functional_relu():
    """DFA's update of the unit before F.relu is the reference ``g·relu'(a)`` pushed into fc1."""
    model = FunctionalActs()
    rule = build_rule("dfa", rule_options_class("dfa")(granularity="children"), model,
                      RuleContext(num_classes=4, input_shape=(12,)))
    x, y = torch.randn(9, 12), torch.randint(0, 4, (9,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    a = model.fc1(x).detach()
    logits = model(x).detach().requires_grad_()
    (e,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), logits)
    g = rule.feedback[0].project(e, out_dtype=torch.float32)
    want = (g * (a > 0)).t() @ x
    model.fc1.weight.register_hook(lambda grad: seen.append(grad.clone()))
    seen = []
    rule.train_step(x, y, optimizer)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-6)


def test_a_forward_with_required_extra_inputs_names_them_and_the_fix():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, mask):
            return self.out(self.fc(x) * mask)

    with pytest.raises(ValueError, match=r"several inputs \(x, mask\) without defaults.*give the others defaults"):
        model_units(TwoInputs(), "layer", ["fc"])


def test_a_model_of_one_unit_is_refused_with_the_fix():
    single = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))
    with pytest.raises(RuleError, match=r"single unit.*plain backprop.*units = \[\.\.\.\]"):
        build_rule("dfa", rule_options_class("dfa")(), single, RuleContext(num_classes=4, input_shape=(12,)))

    class Wrapped(nn.Module):  # one top-level child: "children" has nothing to cut
        def __init__(self):
            super().__init__()
            self.m = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            return self.m(x)

    with pytest.raises(RuleError, match=r"single unit in Wrapped \(units: the whole model \(granularity = \"children\" finds no block stack .* 1 top-level child"):
        build_rule("dfa", rule_options_class("dfa")(granularity="children"), Wrapped(),
                   RuleContext(num_classes=4, input_shape=(12,)))
