"""Per-position logits, any input, cuts anywhere (issue 37).

A model whose logits hold one distribution per position ((N, T, V) or (T, N, V) tokens, (N, C, H, W)
pixels; ``RuleContext.output_layout``) trains with the rules that can take them, each position's
error reaching the unit's output at that position through one C x D feedback matrix; the rules
that cannot refuse in one line. The dry forwards run on ``RuleContext.example_input`` (int64
token ids, several inputs); cuts land inside torch.nn containers; a forward torch.fx cannot trace
is named with its line; ``describe()`` says where every cut landed; a single segment is refused
however it arises; ``trainable_parameters()`` is what an optimizer of one's own holds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.rules import RuleContext, RuleError, build_rule, rule_options_class
from trainer.rules.base import UnitBatch

V, D = 11, 16  # vocabulary (classes) and model width


class TinyLM(nn.Module):
    """A two-block causal transformer LM: (N, T) token ids to (N, T, V) logits, or sequence-first
    (T, N) to (T, N, V) as pytorch/examples' word_language_model."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(V, D)
        self.position = nn.Parameter(torch.randn(64, D) * 0.1)
        layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        steps = tokens.shape[1] if self.batch_first else tokens.shape[0]
        position = self.position[:steps] if self.batch_first else self.position[:steps, None]
        mask = nn.Transformer.generate_square_subsequent_mask(steps)
        return self.head(self.encoder(self.embed(tokens) + position, mask=mask))


def corpus(n: int, steps: int, batch_first: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a repeating pattern (each token is the one before plus 3, mod V) from random
    starts, and the next token as each position's label."""
    start = torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(seed))
    sequence = (start + 3 * torch.arange(steps + 1)) % V
    x, y = sequence[:, :-1], sequence[:, 1:]
    return (x, y) if batch_first else (x.T.contiguous(), y.T.contiguous())


def lm_rule(name: str, model: nn.Module, layout: str, example: torch.Tensor, **options) -> object:
    return build_rule(name, rule_options_class(name)(**options), model,
                      RuleContext(num_classes=V, output_layout=layout, example_input=example))


class Recorder:
    """An optimizer stand-in (no param_groups) that keeps each parameter's update at its step."""

    def __init__(self, params):
        self.params, self.grads = list(params), {}

    def step(self):
        for p in self.params:
            if p.grad is not None:
                self.grads[p] = p.grad.clone()

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


# --- per-position errors ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False], ids=["NTC", "TNC"])
def test_a_transformer_lm_cut_inside_its_encoder_trains_with_dfa(batch_first):
    torch.manual_seed(0)
    model, layout = TinyLM(batch_first), "NTC" if batch_first else "TNC"
    x, y = corpus(16, 12, batch_first)
    rule = lm_rule("dfa", model, layout, x[:2] if batch_first else x[:, :2],
                   units=["encoder.layers.0", "encoder.layers.1"])
    assert rule.unit_names == ["encoder.layers.0", "encoder.layers.1", "output"]
    assert [(b.num_classes, b.dim) for b in rule.feedback] == [(V, D), (V, D)]  # C x D: not C x T·D
    optimizer = torch.optim.Adam(rule.trainable_parameters(), lr=1e-2)
    losses = [rule.train_step(x, y, optimizer).loss.item() for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0], losses[::5]
    assert rule(x).shape == (*y.shape, V)


class TwoUnits(nn.Module):
    """Unit 0 (embedding, dense, tanh) and the head, over any token layout; or, ``dense_map``, two
    convolutions over an image, the second a 1x1 classifier of each pixel."""

    def __init__(self, dense_map: bool = False):
        super().__init__()
        if dense_map:
            self.body = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.Tanh())
            self.head = nn.Conv2d(7, V, 1)
        else:
            self.body = nn.Sequential(nn.Embedding(V, 6), nn.Linear(6, 7), nn.Tanh())
            self.head = nn.Linear(7, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def layout_batch(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Odd shapes: N = 3, T = 5 (H, W = 5, 4), with three positions unlabelled (-100)."""
    g = torch.Generator().manual_seed(4)
    if layout == "NCHW":
        x, y = torch.randn(3, 3, 5, 4, generator=g), torch.randint(0, V, (3, 5, 4), generator=g)
        y[0, 1, 2] = y[2, 4, 0] = y[1, 0, 3] = -100
        return x, y
    x, y = torch.randint(0, V, (3, 5), generator=g), torch.randint(0, V, (3, 5), generator=g)
    y[0, 1] = y[2, 4] = y[1, 0] = -100
    return (x, y) if layout == "NTC" else (x.T.contiguous(), y.T.contiguous())


@pytest.mark.parametrize("layout", ["NTC", "TNC", "NCHW"])
def test_per_position_dfa_follows_the_equations(layout):
    """Unit 0 gets g_t = s/√C · e_t·B at every position t (one B, C x D, for all t); the head gets
    e = ∂ℓ/∂logits with ℓ the mean cross-entropy over the labelled positions."""
    torch.manual_seed(1)
    model = TwoUnits(dense_map=layout == "NCHW")
    x, y = layout_batch(layout)
    rule = build_rule("dfa", rule_options_class("dfa")(feedback_scale=1.0, granularity="children"), model,
                      RuleContext(num_classes=V, output_layout=layout, example_input=x[:2]))
    recorder = Recorder(model.parameters())
    rule.train_step(x, y, recorder)

    h = model.body(x)
    logits = model.head(h.detach())
    classes_last = logits.movedim(1, -1) if layout == "NCHW" else logits
    loss = nn.functional.cross_entropy(classes_last.reshape(-1, V), y.reshape(-1), ignore_index=-100)
    e = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    feedback = rule.feedback[0]
    if layout == "NCHW":
        g = (e.movedim(1, -1) @ feedback.dense() * feedback.scale).movedim(-1, 1)
    else:
        g = e @ feedback.dense() * feedback.scale
    want = [*torch.autograd.grad(h, list(model.body.parameters()), g),
            *torch.autograd.grad(loss, list(model.head.parameters()))]
    for p, expected in zip([*model.body.parameters(), *model.head.parameters()], want, strict=True):
        torch.testing.assert_close(recorder.grads[p], expected, rtol=1e-5, atol=1e-7)


def test_feedback_is_sized_by_the_width_not_by_the_sequence():
    shapes = []
    for steps in (4, 40):
        x, _ = corpus(2, steps)
        rule = lm_rule("dfa", TinyLM(), "NTC", x, units=["encoder.layers.0", "encoder.layers.1"])
        shapes.append([(b.num_classes, b.dim, b.nbytes) for b in rule.feedback])
    assert shapes[0] == shapes[1] == [(V, D, 4 * V * D)] * 2
    optimizer = torch.optim.SGD(rule.trainable_parameters(), lr=0.01)
    for steps in (40, 9):  # built on sequences of 40: any length trains (the last batch of a corpus is short)
        x, y = corpus(4, steps)
        assert torch.isfinite(rule.train_step(x, y, optimizer).loss)


@pytest.mark.parametrize("name", ["dfa", "sdfa", "bdfa"])
def test_unlabelled_positions_get_zero_signal(name):
    torch.manual_seed(2)
    model = TwoUnits()
    x, y = layout_batch("NTC")
    rule = build_rule(name, rule_options_class(name)(granularity="children"), model,
                      RuleContext(num_classes=V, output_layout="NTC", example_input=x))
    outputs = rule.forward_units(x)
    _, error = rule.output_error(outputs[-1].detach(), y)
    signals = rule.signals(UnitBatch(x, y, outputs, error))
    ignored = y == -100
    for signal in signals:
        assert signal.shape[:2] == y.shape
        assert torch.count_nonzero(signal[ignored]) == 0
        assert torch.count_nonzero(signal[~ignored]) > 0


def dense_map_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A pixel's class is the brightest of the image's 3 channels there (V = 11 classes, 3 used)."""
    x = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    return x, x.argmax(1)


@pytest.mark.parametrize("name", ["dfa", "shallow", "trace_bp", "fa", "bp"])
def test_a_dense_map_trains_per_pixel(name):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), nn.Conv2d(8, V, 1))
    x, y = dense_map_batch()
    options = {"keep_first_exact": False} if name == "trace_bp" else {}
    rule = build_rule(name, rule_options_class(name)(**options), model,
                      RuleContext(num_classes=V, input_shape=(3, 6, 6), output_layout="NCHW"))
    optimizer = torch.optim.Adam(rule.trainable_parameters(), lr=1e-2)
    steps = 6 if name == "trace_bp" else 15  # trace_bp's kernels run under the Triton interpreter here: slow
    losses = [rule.train_step(x, y, optimizer).loss.item() for _ in range(steps)]
    assert losses[-1] < 0.9 * losses[0], losses  # shallow: the 1x1 classifier alone learns


@pytest.mark.parametrize("name, options", [
    ("bp", {}), ("fa", {}), ("usf", {}), ("brsf", {}), ("frsf", {}), ("kp", {}), ("sdfa", {}),
    ("bdfa", {}), ("dfa", {"bp_units": ["encoder.layers.0"]}), ("shallow", {}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_rule_that_takes_positions_trains_the_lm(name, options):
    torch.manual_seed(0)
    model = TinyLM()
    x, y = corpus(16, 12)
    cuts = {"units": ["encoder.layers.0", "encoder.layers.1"]} if name in ("sdfa", "bdfa", "dfa", "shallow") else {}
    rule = lm_rule(name, model, "NTC", x[:2], **options, **cuts)
    optimizer = torch.optim.Adam(rule.trainable_parameters(), lr=3e-3)
    losses = [rule.train_step(x, y, optimizer).loss.item() for _ in range(12)]
    assert losses[-1] < losses[0], losses


def test_the_prepared_rule_in_an_own_loop_equals_train_step_per_position():
    x, y = corpus(6, 7)
    updates = []
    for prepared in (False, True):
        torch.manual_seed(0)
        model = TinyLM()
        rule = lm_rule("dfa", model, "NTC", x[:2], units=["encoder.layers.0", "encoder.layers.1"])
        recorder = Recorder(rule.trainable_parameters())
        if prepared:
            net = rule.prepare()
            nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
            recorder.step()
        else:
            rule.train_step(x, y, recorder)
        updates.append([recorder.grads[p] for p in model.parameters()])
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, why", [
    ("drtp", "one label per sample"), ("tpsgd", "one label per sample"),
    ("lra", "one output error vector per sample"), ("rec_lra", "one output error vector per sample"),
])
def test_rules_that_need_one_row_per_sample_refuse_positions(name, why):
    with pytest.raises(RuleError, match=rf"^rule '{name}' cannot train per-position logits \(RuleContext.output_layout "
                                        rf"= 'NTC'\): .*{why}.*; use a rule that can \(dfa, "):
        lm_rule(name, TinyLM(), "NTC", corpus(2, 4)[0])


def test_labels_and_logits_of_the_wrong_shape_are_named():
    x, y = corpus(4, 6)
    with pytest.raises(RuleError, match=r"returns a \(2, 6, 11\) tensor .* needs \(N, 11\) logits: return \(N, C\) "
                                        r"logits from forward, flattened; or, .* RuleContext\(output_layout=\"NTC\""):
        lm_rule("dfa", TinyLM(), "NC", x[:2], units=["encoder.layers.0"])
    rule = lm_rule("bp", TinyLM(), "NTC", x[:2])
    optimizer = torch.optim.SGD(rule.trainable_parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"y must hold class indices, an int64 tensor of shape \(N, T\) \(output_"):
        rule.train_step(x, y[:, 0], optimizer)
    with pytest.raises(RuleError, match=r"labels y have shape \(4, 5\) but the logits \(4, 6, 11\) .* \(4, 6\)"):
        rule.train_step(x, y[:, :5], optimizer)
    with pytest.raises(ValueError, match=r"RuleContext: output_layout must be one of 'NC', 'NTC', 'TNC', 'NCHW'"):
        RuleContext(num_classes=V, output_layout="BTC")


# --- any input --------------------------------------------------------------------------------


class PaddedLM(TinyLM):
    """A forward of two inputs: token ids and their padding mask (True: padding)."""

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[:tokens.shape[1]]
        return self.head(self.encoder(h, src_key_padding_mask=padding))


@pytest.mark.parametrize("name", ["dfa", "bp"])
def test_example_input_takes_token_ids_and_several_inputs(name):
    torch.manual_seed(0)
    x, y = corpus(8, 6)
    padding = torch.zeros(8, 6, dtype=torch.bool)
    padding[:4, 4:] = True  # the last two tokens of four sequences are padding, unlabelled
    y = y.masked_fill(padding, -100)
    model = PaddedLM()
    options = {"units": ["encoder.layers.0", "encoder.layers.1"]} if name == "dfa" else {}
    rule = build_rule(name, rule_options_class(name)(**options), model,
                      RuleContext(num_classes=V, output_layout="NTC", example_input=(x[:2], padding[:2])))
    optimizer = torch.optim.Adam(rule.trainable_parameters(), lr=3e-3)
    losses = [rule.train_step((x, padding), y, optimizer).loss.item() for _ in range(10)]
    assert losses[-1] < losses[0], losses
    with torch.no_grad():
        torch.testing.assert_close(rule.eval()((x, padding)), model(x, padding))
    net = rule.prepare().train()
    nn.functional.cross_entropy(net((x, padding)).flatten(0, 1), y.flatten()).backward()  # the own loop's route


def test_example_input_is_checked_and_sets_the_input_shape():
    ids = torch.zeros(2, 9, dtype=torch.long)
    assert RuleContext(num_classes=V, example_input=ids).input_shape == (9,)
    with pytest.raises(TypeError, match=r"RuleContext: example_input must be a batch the model takes: a tensor .* got "
                                        r"str"):
        RuleContext(num_classes=V, example_input="tokens")
    with pytest.raises(ValueError, match=r"example_input has samples of shape \(9,\) but input_shape = \(8,\)"):
        RuleContext(num_classes=V, input_shape=(8,), example_input=ids)


# --- cuts anywhere, where they landed ---------------------------------------------------------


class Containers(nn.Module):
    """Cuts inside a nested nn.Sequential, an nn.ModuleList loop and an nn.TransformerEncoder."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, D), nn.Sequential(nn.Linear(D, D), nn.ReLU()))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2))
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True),
                                             2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.encoder(h)[:, 0])


def test_cuts_inside_torch_containers_compose_exactly_and_train():
    torch.manual_seed(0)
    model = Containers()
    cuts = ["stem.1.0", "blocks.0", "encoder.layers.0", "encoder.layers.1.linear1"]
    rule = build_rule("dfa", rule_options_class("dfa")(units=cuts), model,
                      RuleContext(num_classes=4, input_shape=(5, 6)))
    assert rule.unit_names == [*cuts, "output"]
    x, y = torch.randn(8, 5, 6), torch.arange(8) % 4
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rule(x), model(x), rtol=0, atol=0)
    text = rule.describe()
    relu = "torch.nn.functional.relu() applied to module 'encoder.layers.1.linear1' (Linear)"
    assert f"signal enters after {relu}" in text
    assert "signal enters after module 'stem.1.1' (ReLU) applied to module 'stem.1.0' (Linear)" in text
    model.train()
    optimizer = torch.optim.Adam(rule.trainable_parameters(), lr=3e-3)
    losses = [rule.train_step(x, y, optimizer).loss.item() for _ in range(10)]
    assert losses[-1] < losses[0], losses


def test_a_cut_inside_another_cut_is_named():
    with pytest.raises(RuleError, match=r"'encoder.layers.0' is never called .* lies inside 'encoder', itself a cut"):
        build_rule("dfa", rule_options_class("dfa")(units=["encoder", "encoder.layers.0"]), Containers(),
                   RuleContext(num_classes=4, input_shape=(5, 6)))


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(4, 4)

    def forward(self, x):
        # fx cannot trace len() of a traced tensor
        count = len(x)
        return self.scale(x) / count


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.inner, self.b = nn.Linear(4, 4), Counted(), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.inner(self.a(x)))


def test_an_untraceable_forward_names_the_module_the_line_and_the_fix():
    with pytest.raises(RuleError, match=r"Untraceable's forward cannot be traced by torch.fx in 'inner' \(Counted, "
                                        r"test_sequence_rules.py:\d+: count = len\(x\)\): .*; cut at 'inner' or at a "
                                        r"module that holds it .* UnitEnd"):
        build_rule("dfa", rule_options_class("dfa")(units=["a"]), Untraceable(),
                   RuleContext(num_classes=2, input_shape=(4,)))
    rule = build_rule("dfa", rule_options_class("dfa")(units=["a", "inner"]), Untraceable(),  # the fix: it stays whole
                      RuleContext(num_classes=2, input_shape=(4,)))
    assert rule.unit_names == ["a", "inner", "output"]


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(nn.functional.relu(self.fc1(x)))))


def test_describe_lists_units_cuts_and_feedback_and_is_the_repr():
    rule = build_rule("bdfa", rule_options_class("bdfa")(units=["fc1", "fc2"]), Mlp(),
                      RuleContext(num_classes=4, input_shape=(12,)))
    text = rule.describe()
    assert repr(rule) == str(rule) == text
    assert text.splitlines()[0].startswith("rule 'bdfa' (BinaryDFA) on Mlp, output layout NC, 548 trainable parameters")
    assert ("unit 0 'fc1': output (2, 16), signal enters after torch.nn.functional.relu() applied to module 'fc1' "
            "(Linear); feedback B 4 x 16 (binary, packed; D = 16 a sample), 16 B") in text
    assert "unit 1 'fc2': output (2, 16), signal enters after torch.tanh() applied to module 'fc2' (Linear)" in text
    assert "unit 2 'output': output (2, 4), ends at the model's output" in text
    fa = build_rule("fa", rule_options_class("fa")(), Mlp(), RuleContext(num_classes=4, input_shape=(12,)))
    assert "fc1 (FeedbackLinear): B 16 x 12, 768 B kept" in fa.describe()


class OneChild(nn.Module):
    """Two top-level children, one of them with parameters: "children" cuts after the flatten."""

    def __init__(self):
        super().__init__()
        self.flatten, self.net = nn.Flatten(), nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(self.flatten(x))


@pytest.mark.parametrize("model, options, message", [
    (Mlp, {"granularity": "children", "bp_units": ["fc1", "fc2"]},
     r"single segment \(bp_units puts all 3 of its units into the top's segment\).*Leave at least one unit"),
    (OneChild, {"granularity": "children"}, r"single segment \(of its units 'flatten', 'output', only 'output' holds "),
    (Mlp, {"units": ["out"]}, (r"single segment \(of its units 'out', 'output', only 'out' holds parameters; a unit "
                               r"without any \(after a cut at the model's last module")),
], ids=["bp_units", "children", "units"])
def test_a_single_segment_is_refused_however_it_arises(model, options, message):
    with pytest.raises(RuleError, match=message):
        build_rule("dfa", rule_options_class("dfa")(**options), model(), RuleContext(num_classes=4, input_shape=(12,)))


# --- the parameters an own optimizer holds ----------------------------------------------------


def test_trainable_parameters_are_the_models_and_the_rules_own():
    model = nn.Sequential(nn.Sequential(nn.Linear(12, 16), nn.ReLU()), nn.Linear(16, 4))
    dfa = build_rule("dfa", rule_options_class("dfa")(), model, RuleContext(num_classes=4, input_shape=(12,)))
    assert list(dfa.parameters()) == [] and dfa.trainable_parameters() == list(model.parameters())
    lra = build_rule("lra", rule_options_class("lra")(), model, RuleContext(num_classes=4, input_shape=(12,)))
    held = {id(p) for p in lra.trainable_parameters()}
    assert held == {id(p) for p in (*model.parameters(), *lra.parameters())}
    assert held == {id(p) for p in lra.prepare().parameters()}
    x, y = torch.randn(8, 12), torch.arange(8) % 4
    with pytest.raises(RuleError, match=r"holds none of the model's 4 trainable parameters but only the rule's own "
                                        r"\(rule.parameters\(\) is the rule's own alone.*"
                                        r"rule.trainable_parameters\(\)"):
        lra.train_step(x, y, torch.optim.SGD(lra.parameters(), lr=0.1))


def test_the_readme_language_model_example_learns(capsys):
    from test_readme_example import run_example

    torch.manual_seed(0)
    namespace = run_example("sequence")
    assert namespace["result"].loss < 0.5  # chance: ln 12 = 2.5
    assert [(b.num_classes, b.dim) for b in namespace["rule"].feedback] == [(12, 32), (12, 32)]
    assert "signal enters after module 'encoder.layers.0' (TransformerEncoderLayer)" in capsys.readouterr().out
