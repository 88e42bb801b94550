"""The feature-map registry (kernels/registry.py): every registered map declares every fact,
the lists the package derives from it equal it, each map's FLOP count matches a measurement,
and a toy map registered here works through FlurkaAttention, RewriteConfig, the cost model,
convert and (under the Triton interpreter or on a GPU) the Triton backend, with no other file
edited.

FLOP oracle (``measure``): the map runs on a small input (B=2, Hx=3, N=5, dh=8) under
``torch.utils.flop_counter.FlopCounterMode``, whose total must equal ``MapFlops.gemm``, and
under ``OpCounter``, a dispatch mode that sees every aten op applied to a tensor derived from
the input and counts them with the cost model's documented conventions (docs/cost_model.md):
pointwise ops 1 per output element, reductions 1 per input element, softmax 5 per element,
views, copies, casts and selections free; exp, elu, sigmoid, softplus and softmax's exp are
also counted as exp-like. Ops on parameters alone (the performer's W * s^(1/2)) are not
activation work and are not seen. An op the counter does not know fails the test.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import flurka_rewrite as fr
from flurka_rewrite.cli import build_parser
from flurka_rewrite.kernels import attention as attention_mod
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.feature_maps import (
    FEATURE_MAPS,
    FeatureMap,
    MapFlops,
    build_feature_map,
    register_feature_map,
    unregister_feature_map,
)
from flurka_rewrite.kernels.registry import (
    AUTO_ROLES,
    REQUIRED_FACTS,
    SOFTMAX,
    TRITON_IDENTITY,
    auto_candidates,
    kernel_choices,
    kernel_names,
    missing_facts,
    triton_codes,
)
from flurka_rewrite.passes import choose as choose_mod
from flurka_rewrite.passes import cost_model
from flurka_rewrite.passes.calibration import work_breakdown
from flurka_rewrite.passes.config import KERNEL_CHOICES, RewriteConfig
from models_handwritten import build

MAPS = list(FEATURE_MAPS)  # parametrised over the registry as collected
B, HX, N, DH, M_TAKEN = 2, 3, 5, 8, 24


def sizes(cls) -> tuple[int, int | None]:
    """(m the map uses for head_dim DH, the num_features to build it with)."""
    if cls.takes_num_features:
        return M_TAKEN, M_TAKEN
    return cls.default_num_features(DH), None


# -- every map declares every fact --------------------------------------------------------------
@pytest.mark.parametrize("name", MAPS)
def test_map_declares_every_fact(name: str) -> None:
    cls = FEATURE_MAPS[name]
    assert missing_facts(cls) == []
    assert cls.name == name and issubclass(cls, FeatureMap)
    assert isinstance(cls.takes_num_features, bool)
    for dh in (4, 8, 48, 64):
        m = cls.default_num_features(dh)
        assert isinstance(m, int) and not isinstance(m, bool) and m >= 1
        assert build_feature_map(name, head_dim=dh).num_features == m  # the default is used
    built = build_feature_map(name, head_dim=DH, num_features=40)
    assert built.num_features == (40 if cls.takes_num_features else cls.default_num_features(DH))
    assert cls.auto_role in AUTO_ROLES
    assert cls.triton_code is None or (isinstance(cls.triton_code, int)
                                       and cls.triton_code != TRITON_IDENTITY)
    m, _ = sizes(cls)
    for is_query in (True, False):
        for causal in (False, True):
            f = cls.flops(10, DH, m, is_query=is_query, causal=causal, groups=2)
            assert isinstance(f, MapFlops)
            assert all(isinstance(v, int) and v >= 0 for v in f) and f.exp <= f.elem
    assert isinstance(cls.causal_stabilized, bool)


@pytest.mark.parametrize("name", MAPS)
def test_optional_facts_match_the_module(name: str) -> None:
    """``weight_shapes`` are the map's stored tensors; ``causal_stabilized`` says whether
    ``causal_key_features`` returns a per-key log scale."""
    cls = FEATURE_MAPS[name]
    m, nf = sizes(cls)
    fm = build_feature_map(name, head_dim=DH, kv_heads=HX, num_features=nf)
    state = fm.state_dict()
    dims = {"head_dim": DH, "kv_heads": HX, "num_features": m}
    for key, shape in cls.weight_shapes.items():
        assert tuple(state[key].shape) == tuple(dims.get(d, d) for d in shape), key
    _, log_scale = fm.causal_key_features(torch.randn(B, HX, N, DH))
    assert (log_scale is not None) == cls.causal_stabilized


@pytest.mark.parametrize("fact", REQUIRED_FACTS)
def test_registration_refuses_a_map_without_a_fact(fact: str) -> None:
    body = {k: v for k, v in vars(ToyExp).items()
            if k != fact and k not in ("__dict__", "__weakref__")}
    incomplete = type("Incomplete", (FeatureMap,), body)
    with pytest.raises(TypeError, match=f"does not declare {fact}"):
        register_feature_map("incomplete")(incomplete)
    assert "incomplete" not in FEATURE_MAPS


def test_registration_refuses_bad_names_codes_and_roles() -> None:
    for bad in (SOFTMAX, "auto", "performer", "two words"):
        with pytest.raises(ValueError):
            register_feature_map(bad)(ToyExp)
    clash = type("Clash", (ToyExp,), {"triton_code": FEATURE_MAPS["relu"].triton_code})
    with pytest.raises(ValueError, match="triton_code 1 is 'relu'"):
        register_feature_map("clash")(clash)
    for attr, value in (("triton_code", TRITON_IDENTITY), ("auto_role", "sometimes"),
                        ("takes_num_features", "yes")):
        wrong = type("Wrong", (ToyExp,), {attr: value})
        with pytest.raises(TypeError, match=attr):
            register_feature_map("wrong")(wrong)
    assert not {"clash", "wrong"} & set(FEATURE_MAPS)


def test_triton_codes_unique_and_named_in_the_kernels() -> None:
    codes = [c.triton_code for c in FEATURE_MAPS.values() if c.triton_code is not None]
    assert len(codes) == len(set(codes)) and TRITON_IDENTITY not in codes
    assert triton_codes() == {"identity": TRITON_IDENTITY, "performer": 3, "relu": 1, "rnn": 2}
    tk = pytest.importorskip("flurka_rewrite.kernels.triton_kernels")
    named = {k: v.value for k, v in vars(tk).items() if k.startswith("FMAP_")}
    # every code the registry hands the kernels has a named branch there, and no other
    assert sorted(named.values()) == sorted(triton_codes().values())
    assert named["FMAP_PERFORMER"] == FEATURE_MAPS["performer"].triton_code
    assert named["FMAP_RELU"] == FEATURE_MAPS["relu"].triton_code
    assert named["FMAP_ELU"] == FEATURE_MAPS["rnn"].triton_code
    ops = pytest.importorskip("flurka_rewrite.kernels.triton_ops")
    assert ops.IN_KERNEL_CODES == set(triton_codes().values()) - {TRITON_IDENTITY}


# -- derived lists --------------------------------------------------------------------------------
def test_derived_lists_equal_the_registry() -> None:
    assert kernel_names() == (*FEATURE_MAPS, SOFTMAX)
    assert attention_mod.KERNELS == cost_model.KERNELS == kernel_names()
    assert KERNEL_CHOICES == kernel_choices() == (*FEATURE_MAPS, SOFTMAX, "auto")
    roles = {n: c.auto_role for n, c in FEATURE_MAPS.items()}
    assert cost_model.AUTO_KERNELS_PRETRAINED == auto_candidates(True) == (
        *(n for n in FEATURE_MAPS if roles[n] == "pretrained"), SOFTMAX)
    assert cost_model.AUTO_KERNELS_TRAINABLE == auto_candidates(False) == (
        *(n for n in FEATURE_MAPS if roles[n] in ("pretrained", "trainable")), SOFTMAX)
    # today's lists, in today's order (ties go to the earlier candidate)
    assert tuple(FEATURE_MAPS)[:4] == ("performer", "relu", "rnn", "ffk")
    assert tuple(cost_model.AUTO_KERNELS_PRETRAINED) == ("performer", "softmax")
    assert tuple(cost_model.AUTO_KERNELS_TRAINABLE) == ("performer", "relu", "rnn", "softmax")
    help_text = build_parser().format_help()
    assert ", ".join(kernel_choices()) in " ".join(help_text.split())


# -- FLOP counts against a measurement -------------------------------------------------------------
_FREE = {"detach", "view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "t", "transpose",
         "permute", "reshape", "clone", "_to_copy", "copy", "alias", "slice", "select",
         "masked_fill", "where", "contiguous", "lift_fresh", "empty_like", "zeros_like"}
_GEMM = {"mm", "bmm", "matmul"}  # counted by FlopCounterMode
_POINTWISE = {"add", "sub", "mul", "div", "relu", "clamp_min", "neg", "exp", "elu", "sigmoid",
              "softplus", "cos", "sin", "abs"}
_EXP_LIKE = {"exp", "elu", "sigmoid", "softplus"}
_REDUCTIONS = {"sum", "amax", "amin", "mean", "max", "logsumexp"}


class OpCounter(TorchDispatchMode):
    """Elementwise and exp-like FLOPs of the aten ops applied to tensors derived from the
    tensors given (see the module docstring for the conventions)."""

    def __init__(self, *roots: torch.Tensor) -> None:
        super().__init__()
        self.keep = list(roots)  # holds them alive, so their ids stay theirs
        self.ids = {id(t) for t in roots}
        self.elem = self.exp = 0
        self.unknown: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        if not any(id(a) in self.ids for a in ins):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.keep.append(t)
                self.ids.add(id(t))
        name = func.overloadpacket.__name__.rstrip("_")
        first = tree_flatten(out)[0][0]
        if name in _FREE or name in _GEMM:
            pass
        elif name == "_softmax":  # max, subtract, exp, sum, divide
            self.elem += 5 * first.numel()
            self.exp += first.numel()
        elif name in _POINTWISE:
            self.elem += first.numel()
            self.exp += first.numel() if name in _EXP_LIKE else 0
        elif name in _REDUCTIONS:
            self.elem += ins[0].numel()
        else:
            self.unknown.append(name)
        return out


def measure(fm: FeatureMap, x: torch.Tensor, *, is_query: bool, causal: bool) -> MapFlops:
    """What applying ``fm`` to x costs: FlopCounterMode's gemm, OpCounter's elem and exp."""
    def run():
        with torch.no_grad():
            if causal and not is_query:
                return fm.causal_key_features(x)
            return fm(x, is_query=is_query)

    with FlopCounterMode(display=False) as fc:
        run()
    counter = OpCounter(x)
    with counter:
        run()
    assert counter.unknown == [], f"ops the oracle does not classify: {counter.unknown}"
    return MapFlops(fc.get_total_flops(), counter.elem, counter.exp)


def check_flops(name: str, is_query: bool, causal: bool, kv_heads: int = HX) -> None:
    cls = FEATURE_MAPS[name]
    m, nf = sizes(cls)
    fm = build_feature_map(name, head_dim=DH, kv_heads=kv_heads, num_features=nf, seed=1)
    x = torch.randn(B, HX, N, DH, generator=torch.Generator().manual_seed(0))
    want = measure(fm, x, is_query=is_query, causal=causal)
    got = cls.flops(B * HX * N, DH, m, is_query=is_query, causal=causal, groups=B * HX)
    assert got == want, (name, is_query, causal)


@pytest.mark.parametrize("is_query,causal", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("name", MAPS)
def test_flops_match_a_measurement(name: str, is_query: bool, causal: bool) -> None:
    check_flops(name, is_query, causal)


def test_ffk_flops_with_shared_kv_head() -> None:
    check_flops("ffk", is_query=True, causal=False, kv_heads=1)  # GQA: one map, 3 heads


def test_site_flops_uses_the_map_counts() -> None:
    """site_flops' feature-map part is the class's count for keys and queries (a
    ``custom_attention`` map's core is its own ``attention_flops``)."""
    for name in MAPS:
        cls = FEATURE_MAPS[name]
        m, nf = sizes(cls)
        kw = dict(dk=None, B=B, N=N, M=7, H=HX, Hkv=1, dh=DH, num_features=nf,
                  projections=False)
        total = cost_model.site_flops(kernel=name, **kw)
        if cls.custom_attention:
            f = cls.attention_flops(B=B, N=N, K=7, H=HX, Hkv=1, dh=DH, m=m, causal=False)
            assert total == f.gemm + f.elem, name
            continue
        k = cls.flops(B * 7, DH, m, is_query=False, groups=B)
        q = cls.flops(B * HX * N, DH, m, is_query=True)
        readout = 2 * B * 7 * m * (DH + 1) + 2 * B * HX * N * m * (DH + 1)
        assert total == k.gemm + k.elem + q.gemm + q.elem + readout + B * HX * N * (1 + DH)


# -- a toy map registered here --------------------------------------------------------------------
class ToyExp(FeatureMap):
    """phi(x) = exp(x / 2), m = dh: a positive map with no weights (test only)."""

    takes_num_features = False
    auto_role = None
    triton_code = None

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        return head_dim

    @classmethod
    def flops(cls, rows: int, dh: int, m: int, *, is_query: bool, causal: bool = False,
              groups: int = 1) -> MapFlops:
        return MapFlops(0, 2 * rows * dh, rows * dh)  # x * 0.5, exp

    def __init__(self, head_dim: int, **_: object) -> None:
        super().__init__()
        self.num_features = head_dim

    def forward(self, x, *, is_query, key_mask=None):
        return torch.exp(x.float() * 0.5)


TOY = "toy_exp"


@pytest.fixture
def toy():
    register_feature_map(TOY)(ToyExp)
    try:
        yield TOY
    finally:
        unregister_feature_map(TOY)


def kernel_attention_f64(q, k, v, causal: bool, eps: float = 1e-6) -> torch.Tensor:
    """O_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps), j <= i if causal;
    phi(x) = exp(x / 2), in float64."""
    pq, pk = torch.exp(q.double() / 2), torch.exp(k.double() / 2)
    a = pq @ pk.transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a @ v.double()) / (a.sum(-1, keepdim=True) + eps)


def test_toy_map_is_a_kernel_while_registered(toy: str) -> None:
    assert toy in kernel_names() and toy in attention_mod.KERNELS and toy in KERNEL_CHOICES
    assert cost_model.KERNELS == kernel_names()
    assert RewriteConfig(kernel=toy, dk=None).kernel == toy
    with pytest.raises(ValueError, match="applies to kernel='performer' or 'ffk'"):
        RewriteConfig(kernel=toy, num_features=4)
    assert cost_model.AUTO_KERNELS_TRAINABLE == ("performer", "relu", "rnn", "softmax")
    check_flops(toy, is_query=True, causal=False)
    check_flops(toy, is_query=False, causal=True)


def test_toy_map_gone_after_unregister() -> None:
    register_feature_map(TOY)(ToyExp)
    unregister_feature_map(TOY)
    assert TOY not in kernel_names() and TOY not in KERNEL_CHOICES
    with pytest.raises(ValueError, match=f"unknown kernel '{TOY}'"):
        RewriteConfig(kernel=TOY)
    with pytest.raises(ValueError, match=f"unknown kernel '{TOY}'"):
        FlurkaAttention(kernel=TOY, heads=2, head_dim=4)


@pytest.mark.parametrize("causal", [False, True])
def test_toy_map_through_flurka_attention(toy: str, causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) * 0.5 for _ in range(3))
    fa = FlurkaAttention(kernel=toy, heads=4, head_dim=8, causal=causal, backend="torch")
    assert fa.num_features == 8 and isinstance(fa.feature_map, ToyExp)
    torch.testing.assert_close(fa(q, k, v).double(), kernel_attention_f64(q, k, v, causal),
                               atol=1e-5, rtol=1e-5)


def test_toy_map_low_rank(toy: str) -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) * 0.5 for _ in range(3))
    fa = FlurkaAttention(kernel=toy, heads=4, head_dim=8, dk=5, max_seq_len=12,
                         e_init="gaussian", backend="torch")
    E, F = fa.E.detach()[:, :9], fa.F.detach()[:, :9]  # dense: every key is kept
    want = kernel_attention_f64(q, E @ k, F @ v, causal=False)
    torch.testing.assert_close(fa(q, k, v).double(), want, atol=1e-5, rtol=1e-5)


def test_toy_map_in_the_cost_model_and_convert(toy: str) -> None:
    flops = cost_model.site_flops(kernel=toy, dk=4, B=1, N=16, M=16, H=2, Hkv=2, dh=8, dm=16)
    assert flops > 0 and cost_model.method_of(toy, 4) == "flurka"
    c = choose_mod.choose(kernel=toy, dk="auto", num_features=None, B=1, N=256, M=256, H=2,
                          Hkv=2, dh=8, dm=16, causal=False, hoistable=True)
    assert c.kernel == toy and c.num_features == 8
    assert work_breakdown(kernel=toy, dk=None, B=1, N=16, M=16, H=2, Hkv=2, dh=8)["exp"] == \
        2 * 16 * 2 * 8  # queries and keys, dh exps each
    case = build("matmul_div_add")
    new = fr.convert(case.model, kernel=toy, dk=5, example_inputs=case.inputs)
    mods = [m for m in new.modules() if isinstance(m, FlurkaAttention)]
    assert mods and all(m.kernel == toy for m in mods)
    with torch.no_grad():
        assert torch.isfinite(new(*case.inputs)).all()


def test_auto_role_of_a_registered_map() -> None:
    """A map with auto_role "trainable" joins kernel="auto"'s training candidates after the
    built-in maps and before softmax; the pretrained candidates are unchanged."""
    role = type("ToyTrainable", (ToyExp,), {"auto_role": "trainable"})
    register_feature_map(TOY)(role)
    try:
        assert cost_model.AUTO_KERNELS_TRAINABLE == ("performer", "relu", "rnn", TOY, "softmax")
        assert cost_model.AUTO_KERNELS_PRETRAINED == ("performer", "softmax")
        c = choose_mod.choose(kernel="auto", dk=None, num_features=None, B=1, N=512, M=512,
                              H=2, Hkv=2, dh=8, dm=None, causal=False, hoistable=False,
                              pretrained=False)
        assert "candidates performer, relu, rnn, toy_exp and full" in c.reason
    finally:
        unregister_feature_map(TOY)


def _triton_ready() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_ready(), reason="needs triton and a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("causal", [False, True])
def test_toy_map_on_triton(toy: str, causal: bool) -> None:
    """No triton_code: phi computed by the module, the fused core with the identity map."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g).mul(0.5).to(dev).requires_grad_()
               for _ in range(3))
    outs, grads = [], []
    for backend in ("torch", "triton"):
        fa = FlurkaAttention(kernel=toy, heads=2, head_dim=8, causal=causal, backend=backend)
        out = fa(q, k, v)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
