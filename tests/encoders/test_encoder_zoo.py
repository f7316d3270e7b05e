"""The encoder contract, checked for every registered encoder on tiny shapes.

Each registered encoder needs an entry in ``CASES`` (braindecode's ``models_test_cases``
pattern): ``test_every_encoder_has_a_case`` fails when one is added without tests.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from brainalign._checks import BrainalignError
from brainalign.encoders import (
    REFERENCE_SHAPES,
    count_parameters,
    create_encoder,
    describe_encoders,
    encoder_info,
    list_encoders,
)

EMBED = 16
BATCH = 3


@dataclass(frozen=True)
class Case:
    n_chans: int
    n_times: int
    arch: dict[str, Any] = field(default_factory=dict)
    n_subjects: int | None = None


CASES: dict[str, Case] = {
    "nice": Case(8, 100),
    "atms": Case(6, 100, dict(d_model=80, n_heads=2, d_ff=32, n_filters=8), n_subjects=2),
    "eegnet": Case(4, 100),
    "eegconformer": Case(5, 100, dict(num_layers=1, n_filters_time=8)),
    "shallowfbcspnet": Case(4, 100, dict(n_filters_time=8, n_filters_spat=8)),
    "mlp": Case(32, 1, dict(width=32, n_blocks=2)),
}
NAMES = list_encoders()


def build(name: str, seed: int = 0, **extra: Any) -> nn.Module:
    case = CASES[name]
    torch.manual_seed(seed)
    arch = case.arch | extra
    return create_encoder(
        name, n_chans=case.n_chans, n_times=case.n_times, embed_dim=EMBED, n_subjects=case.n_subjects, **arch
    )


def inputs(name: str, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """A batch for ``name``; subject-aware encoders also get every training subject and -1."""
    case = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, case.n_chans, case.n_times, generator=g)
    if encoder_info(name).subject_aware:
        assert case.n_subjects is not None and case.n_subjects + 1 <= BATCH
        subjects = torch.tensor(list(range(case.n_subjects)) + [-1] * (BATCH - case.n_subjects))
        return x, subjects
    return (x,)


def run(model: nn.Module, args: tuple[torch.Tensor, ...], seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    out: torch.Tensor = model(*args)
    return out


def test_every_encoder_has_a_case() -> None:
    assert set(NAMES) == set(CASES), f"encoders without a test case: {sorted(set(NAMES) - set(CASES))}"


def test_registry_names_and_modalities() -> None:
    assert set(NAMES) >= {"nice", "atms", "eegnet", "eegconformer", "shallowfbcspnet", "mlp"}
    for name in NAMES:
        info = encoder_info(name)
        assert info.modalities and set(info.modalities) <= set(REFERENCE_SHAPES), name
        assert info.reference
        doc = info.cls.__doc__ or ""
        assert "Reference" in doc and "arameter count" in doc, f"{name}: docstring lacks reference/count"
    assert encoder_info("atms").subject_aware
    assert not encoder_info("nice").subject_aware
    assert encoder_info("mlp").modalities == ("fmri",)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_finite(name: str) -> None:
    model = build(name)
    for mode in (True, False):
        model.train(mode)
        out = run(model, inputs(name))
        assert out.shape == (BATCH, EMBED)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = build(name)
    # Train mode: every parameter gets a finite gradient.
    run(model.train(), inputs(name)).square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}: no gradient"
    # Eval mode: BN uses running statistics, so even biases right before a BN (whose gradient a
    # train-mode BN cancels exactly) must get a non-zero gradient.
    model.zero_grad(set_to_none=True)
    run(model.eval(), inputs(name)).square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}: zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_model_and_output(name: str) -> None:
    a, b = build(name, seed=0), build(name, seed=0)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(run(a, inputs(name)), run(b, inputs(name)), rtol=0, atol=0)
    c = build(name, seed=1)
    assert not torch.allclose(run(a.eval(), inputs(name)), run(c.eval(), inputs(name)))


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name: str) -> None:
    model = build(name).eval()
    with torch.no_grad():
        first = run(model, inputs(name), seed=3)
        second = run(model, inputs(name), seed=4)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def _stochastic(m: nn.Module) -> bool:
    """Modules whose train mode is dropout or batch-norm statistics, and nothing else."""
    if isinstance(m, (_DropoutNd, _BatchNorm)):
        return True
    # braindecode's attention applies its attention-weight dropout functionally (SDPA dropout_p
    # when self.training), so the module itself is a dropout site.
    return type(m).__module__.startswith("braindecode.") and type(m).__name__ == "MultiHeadAttention"


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_differ_only_through_dropout_and_batchnorm(name: str) -> None:
    model = build(name)
    with torch.no_grad():
        eval_out = run(model.eval(), inputs(name))
        assert any(_stochastic(m) for m in model.modules())
        full_train = copy.deepcopy(model).train()  # a train forward updates BN running stats
        assert not torch.allclose(run(full_train, inputs(name)), eval_out), "train mode changed nothing"
        model.train()
        for m in model.modules():  # train mode everywhere except dropout and batch norm
            if _stochastic(m):
                m.eval()
        torch.testing.assert_close(run(model, inputs(name)), eval_out)


def test_subject_aware_encoder_handles_unseen_subjects() -> None:
    model = build("atms").eval()
    x, _ = inputs("atms")
    with torch.no_grad():
        seen = model(x, torch.tensor([0, 0, 0]))
        other = model(x, torch.tensor([1, 1, 1]))
        unseen = model(x, torch.tensor([-1, -1, -1]))
        mixed = model(x, torch.tensor([0, 1, -1]))
    assert torch.isfinite(unseen).all()
    assert not torch.allclose(seen, other) and not torch.allclose(seen, unseen)
    # The token is per sample, not per batch (the reference switched the whole batch).
    torch.testing.assert_close(mixed, torch.stack([seen[0], other[1], unseen[2]]))
    with pytest.raises(BrainalignError, match="subject-aware"):
        model(x)
    with pytest.raises(BrainalignError, match=r"\[-1, 2\)"):
        model(x, torch.tensor([0, 2, -1]))
    with pytest.raises(BrainalignError, match="LongTensor"):
        model(x, torch.tensor([0.0, 1.0, 0.0]))


def test_atms_keeps_every_channel() -> None:
    """The reference dropped the last channel; here every channel reaches the output."""
    model = build("atms", subject_drop_prob=0.0).eval()
    x, s = inputs("atms")
    x.requires_grad_(True)
    model(x, s).sum().backward()
    assert x.grad is not None
    assert (x.grad.abs().sum(dim=(0, 2)) > 0).all()


def test_atms_subject_dropout_trains_the_shared_token() -> None:
    model = build("atms", subject_drop_prob=1.0).train()
    x, _ = inputs("atms")
    model(x, torch.tensor([0, 0, 1])).sum().backward()
    grad = model.subject_embedding.weight.grad
    assert grad is not None
    assert grad[-1].abs().sum() > 0 and grad[:-1].abs().sum() == 0


def test_unknown_encoder_suggests_closest() -> None:
    with pytest.raises(BrainalignError, match="Did you mean 'nice'"):
        create_encoder("nicee", n_chans=4, n_times=100, embed_dim=EMBED)
    with pytest.raises(BrainalignError, match="Did you mean 'drop_prob'"):
        create_encoder("nice", n_chans=4, n_times=100, embed_dim=EMBED, dropprob=0.1)


@pytest.mark.parametrize(
    ("name", "n_times", "match"),
    [
        ("nice", 60, r"n_times=60.*75"),
        ("atms", 1, r"n_times=1.*fMRI"),
        ("eegnet", 20, r"n_times=20.*pool"),
        ("eegconformer", 30, r"n_times=30.*34"),
        ("shallowfbcspnet", 98, r"n_times=98.*99"),
        ("mlp", 250, r"n_times=250.*EEG/MEG"),
    ],
)
def test_impossible_shapes_fail_clearly(name: str, n_times: int, match: str) -> None:
    with pytest.raises(BrainalignError, match=match):
        create_encoder(name, n_chans=4, n_times=n_times, embed_dim=EMBED)


@pytest.mark.parametrize("name", [n for n in NAMES if encoder_info(n).modalities != ("fmri",)])
def test_eeg_encoders_refuse_fmri_shapes(name: str) -> None:
    with pytest.raises(BrainalignError, match=r"n_times=1\).*fMRI"):
        create_encoder(name, n_chans=15724, n_times=1, embed_dim=EMBED)


def test_atms_refuses_short_d_model() -> None:
    with pytest.raises(BrainalignError, match="d_model=50"):
        create_encoder("atms", n_chans=4, n_times=100, embed_dim=EMBED, d_model=50)


def test_mlp_refuses_eeg_shaped_batches() -> None:
    model = build("mlp")
    with pytest.raises(BrainalignError, match=r"\(batch, 32, 1\)"):
        model(torch.randn(2, 32, 5))


SHAPES = {"eeg": (63, 250), "eeg17": (17, 100), "meg": (271, 201), "fmri": REFERENCE_SHAPES["fmri"]}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_builds_at_the_datasets_shapes(name: str, shape: str) -> None:
    """Build only (no forward at these sizes): where the modality fits, or refuse clearly."""
    n_chans, n_times = SHAPES[shape]
    fits = shape.rstrip("0123456789") in encoder_info(name).modalities
    kwargs = dict(n_chans=n_chans, n_times=n_times, embed_dim=768, n_subjects=10)
    if fits:
        assert count_parameters(name, **kwargs) > 0
    else:
        with pytest.raises(BrainalignError, match=f"n_times={n_times}"):
            count_parameters(name, **kwargs)


def test_nice_parameter_counts_match_the_reference() -> None:
    model = create_encoder("nice", n_chans=63, n_times=250, embed_dim=768)
    conv = sum(p.numel() for m in (model.tsconv, model.projection) for p in m.parameters())
    assert conv == 103_680
    assert model.n_features == 1440
    total = sum(p.numel() for p in model.parameters())
    assert total == 2_393_088 and round(total / 1e6, 2) == 2.39
    assert round(count_parameters("nice", n_chans=63, n_times=250, embed_dim=512) / 1e6, 2) == 1.37
    assert create_encoder("nice", n_chans=17, n_times=100, embed_dim=8).n_features == 240
    assert create_encoder("nice", n_chans=271, n_times=201, embed_dim=8).n_features == 1040


def test_other_parameter_counts_match_the_reference() -> None:
    kw = dict(n_chans=63, n_times=250, n_subjects=10)
    # ATM-S (AlignVis: about 2.84M at D=768, 4.13M at D=1024, incl. repr_layer)
    assert round(count_parameters("atms", embed_dim=768, **kw) / 1e6, 2) == 2.84
    assert round(count_parameters("atms", embed_dim=1024, **kw) / 1e6, 2) == 4.13
    # EEGNet (AlignVis: about 89k at D=768 on 16 x 7 = 112 features)
    assert round(count_parameters("eegnet", embed_dim=768, n_chans=63, n_times=250) / 1e3) == 89
    # MindEye MLP on NSD subject 1 (AlignVis: about 134M without our repr_layer)
    n = count_parameters("mlp", n_chans=15724, n_times=1, embed_dim=768)
    assert n - (768 * 768 + 768) == 134_722_304


def test_describe_encoders_lists_every_encoder() -> None:
    rows = {r["name"]: r for r in describe_encoders()}
    assert set(rows) == set(NAMES)
    assert rows["nice"]["params"] == 2_393_088 and rows["nice"]["shape"] == "63x250"
    assert rows["mlp"]["shape"] == "15724x1" and rows["mlp"]["params"] > 1e8
    assert rows["atms"]["subject_aware"] is True


def test_importing_the_registry_does_not_import_braindecode() -> None:
    code = "import sys, brainalign.encoders as e; e.list_encoders(); print('braindecode' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
