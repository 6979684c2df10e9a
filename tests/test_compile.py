"""A patched timm model under torch.compile and torch.export, and the custom operators of the
fused kernels (backends/_torch_ops.py).

The models are tiny ViTs built from timm's class (no download): 16 patch tokens, 4 blocks.
Dynamo runs with a backend that counts the graphs it is given and runs them as traced
(inductor once, at the end), so that a graph break, a recompilation or a host read under
tracing shows as a count, and a wrong trace as logits that differ from the eager model's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch.compile needs PyTorch")
timm = pytest.importorskip("timm", reason="the timm patch needs timm (pip install timm)")

from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from tokenpool_ops.backends import _torch_ops  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import tokenpool_ops  # noqa: E402
from tests.conftest import checkout_first, cuda_or_skip  # noqa: E402
from tokenpool_ops import backends  # noqa: E402
from tokenpool_ops._pool import METHODS  # noqa: E402
from tokenpool_ops.timm import patch_timm  # noqa: E402

#: Patch tokens after each block of the tiny ViT (16 patches): every block pools.
SCHEDULE = [12, 9, 6, 4]
#: The methods whose blocks compute Eq. 5 scores (with 'wkmeans' and 'wkmedoids').
SCORED = ("wkmeans", "wkmedoids", "topk", "importance")


def tiny_vit(method: str, training: bool = False, schedule: list[int] = SCHEDULE,
             **options: Any) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=len(schedule),
                              num_heads=2, num_classes=10)
    return patch_timm(model.train(training), schedule, method, **options)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class GraphCounter:
    """A dynamo backend that keeps every graph it gets and runs it as traced (no compiler)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(gm)
        return gm.forward

    def op_calls(self, name: str) -> int:
        target = getattr(torch.ops.tokenpool_ops, name).default
        return sum(node.target == target for gm in self.graphs for node in gm.graph.nodes)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def numba_installed() -> bool:
    return backends.numba_available()


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)


@pytest.mark.parametrize("method", METHODS)
def test_inference_compiles_to_one_graph_with_the_eager_logits(method):
    model, x = tiny_vit(method), images()
    counter = GraphCounter()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = model(x)
        got = torch.compile(model, backend=counter, fullgraph=True)(x)
    # Dynamo warns where it traces through a cache wrapper ("potential silent incorrectness").
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert len(counter.graphs) == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if numba_installed():  # each block's plan one operator, its attention and scores another
        assert counter.op_calls("plan") == len(SCHEDULE)
        assert counter.op_calls("attention_with_scores") == (
            len(SCHEDULE) if method in SCORED else 0)
        assert counter.op_calls("kmedoids") == counter.op_calls("kmeans") == 0  # in the plan


def eager_and_compiled_training_step(model: torch.nn.Module, x: torch.Tensor,
                                     counter: GraphCounter) -> tuple[list[Any], list[Any]]:
    """The loss and the parameters' gradients of one step, eager then compiled."""
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    losses, grads = [], []
    for forward in (model, compiled):
        model.zero_grad()
        loss = forward(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    return losses, grads


@pytest.mark.parametrize("method", ["wkmedoids", "kmeans", "topk", "tome"])
def test_training_compiles_to_one_graph_with_the_eager_loss_and_gradients(method):
    # The differentiable merge (tokenpool_ops.nn.merge) inside the graph; dropout is 0.
    model, x = tiny_vit(method, training=True), images()
    counter = GraphCounter()
    losses, grads = eager_and_compiled_training_step(model, x, counter)
    assert len(counter.graphs) == 1  # the forward graph; AOTAutograd derives the backward
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    if numba_installed():  # the plan an operator; attention and merge traced (autograd)
        assert counter.op_calls("plan") == len(SCHEDULE)
        assert counter.op_calls("attention_with_scores") == 0


def test_calls_again_and_new_batch_sizes_never_recompile_per_block():
    # Same shape: no recompilation. A new batch size: at most one (dynamo's dynamic shapes),
    # not one per block, and the recompile limit is never reached.
    model = tiny_vit("wkmedoids")
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for batch in (2, 2, 3, 5, 3):
            x = images(batch, seed=batch)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(counter.graphs) <= 2
    assert not counters["graph_break"]


def test_models_patched_alike_share_one_compilation():
    # Dynamo guards a compiled forward on the model's class: one patched class per timm
    # class, so a model patched again (a notebook re-run, an evaluation copy) reuses the
    # compiled code. With a class per patch, the ninth such model in a process hit the
    # recompile limit (here lowered to 2, so the third would).
    counter, x = GraphCounter(), images()
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for _ in range(4):
            model = tiny_vit("wkmedoids")
            got = torch.compile(model, backend=counter, fullgraph=True)(x)
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert len(counter.graphs) == 1
    assert type(tiny_vit("tome")) is type(model)


COMPILED_FIRST = """
import sys, torch
from torch._dynamo.utils import counters
import tokenpool_ops
entry = sys.argv[1]
x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
if entry == "pool":
    function = lambda t: tokenpool_ops.pool(t, 5, "kmedoids")
elif entry == "TokenPooling":
    from tokenpool_ops.nn import TokenPooling
    function = TokenPooling(5, "wkmedoids")
    x = (x, torch.rand(2, 16, generator=torch.Generator().manual_seed(1)))
else:
    from timm.models.vision_transformer import VisionTransformer
    from tokenpool_ops.timm import patch_timm
    torch.manual_seed(0)
    function = patch_timm(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                            num_heads=2, num_classes=10).eval(), [12, 9, 6, 4])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
compiled = torch.compile(function, backend="eager", fullgraph=True)
with torch.no_grad():
    for run in (compiled, compiled, function, compiled):
        run(*x) if isinstance(x, tuple) else run(x)
print(counters["stats"]["unique_graphs"])
"""


@pytest.mark.parametrize("entry", ["pool", "TokenPooling", "patch_timm"])
def test_compiled_before_any_eager_call_compiles_once(entry):
    # A fresh process, so that nothing is known yet: compiled first, called again, then
    # eagerly, then compiled again, one compilation. The answers the library keeps for the
    # next call (namespaces, primitives, result fields, the kernels at hand) were filled
    # by the traced call or the eager one, after the trace had read them empty, so the
    # second compiled call compiled everything again.
    env = dict(os.environ, PYTHONPATH=checkout_first(os.environ.get("PYTHONPATH")))
    done = subprocess.run([sys.executable, "-c", COMPILED_FIRST, entry], capture_output=True,
                          text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "1"


def test_without_numba_the_generic_path_is_traced():
    # No fused kernel: no custom op in the graph, the PyTorch loop traced in its place (its
    # max_iter iterations), with the same logits.
    model, x = tiny_vit("wkmedoids"), images()
    counter = GraphCounter()
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(backends, "_compiled_paths", lambda name: {})
        want = model(x)
        got = torch.compile(model, backend=counter, fullgraph=True)(x)
    assert len(counter.graphs) == 1
    for name in ("plan", "attention_with_scores", "kmedoids", "weighted_means"):
        assert counter.op_calls(name) == 0, name
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inductor_compiles_the_pooled_model():
    # One block only: inductor's C++ compilation is the slow part of this test.
    model, x = tiny_vit("wkmedoids", schedule=[4]), images()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _cpp_kernels(schedule: list[int]) -> int:
    """Distinct C++ kernels inductor writes for the tiny ViT with this schedule."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model, x = tiny_vit("wkmedoids", schedule=schedule), images()
    with torch.no_grad():
        want = model(x)
        got, sources = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return sum(source.count("async_compile.cpp_pybinding(") for source in sources)


@pytest.mark.skipif(not numba_installed(), reason="the plan operator needs Numba's kernels")
def test_inductor_shares_the_kernels_of_blocks_after_pooling():
    """SLOW (two inductor compilations, about 1 min): after a block's plan operator the
    token count is a symbolic size, so blocks that get different counts share one kernel
    for each of their layer norms, GELU and residual adds: two more pooling blocks add no
    kernel (traced with their own counts, each block added its own)."""
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph has no code
        two, four = _cpp_kernels([12, 9]), _cpp_kernels([12, 9, 6, 4])
    assert two > 0 and four == two


def test_plan_sizes_are_symbolic_with_fullgraph_and_fixed_without():
    # fullgraph=True lets the plan operator's kept-token axis be a size known by its range
    # only; without fullgraph dynamo refuses such sizes, so the operator gives the fixed k
    # and the model still compiles to one graph.
    model, x = tiny_vit("wkmedoids"), images()
    target = torch.ops.tokenpool_ops.plan.default
    for fullgraph in (True, False):
        torch._dynamo.reset()
        counter = GraphCounter()
        with torch.no_grad():
            want = model(x)
            got = torch.compile(model, backend=counter, fullgraph=fullgraph)(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len(counter.graphs) == 1 and not counters["graph_break"]
        if not numba_installed():
            continue
        # The operator's first output is the new sequence: the class token and the kept ones.
        lengths = [node.meta["example_value"][0].shape[1] for gm in counter.graphs
                   for node in gm.graph.nodes if node.target == target]
        assert len(lengths) == len(SCHEDULE)
        if fullgraph:  # one symbol each, not 1 + a symbol: inductor reshapes it without a copy
            assert all(isinstance(size, torch.SymInt) and size.node.expr.is_Symbol
                       for size in lengths)
        else:
            assert lengths == [1 + k for k in SCHEDULE]
    # On CUDA the sizes are always the numbers (inductor's Triton tiling failed on symbols).
    assert _torch_ops._sequence_size(1, 5, "cuda") == 6


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_transformers_inference_compiles_to_one_graph_with_the_eager_logits(implementation):
    # The transformers patch takes the same operators as timm's blocks: the plan, and under
    # SDPA the attention with its scores (eager attention returns its probabilities, for
    # output_attentions, so it keeps the model's own attention function).
    transformers = pytest.importorskip("transformers", reason="the patch needs transformers")
    from tokenpool_ops.transformers import patch_transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8,
                                    num_labels=5, attn_implementation=implementation)
    torch.manual_seed(0)
    model = patch_transformers(transformers.ViTForImageClassification(config).eval(),
                               [12, 6, 3], "wkmedoids")
    x, counter = images(), GraphCounter()
    with torch.no_grad():
        want = model(x).logits
        got = torch.compile(model, backend=counter, fullgraph=True)(x).logits
    assert len(counter.graphs) == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if numba_installed():
        assert counter.op_calls("plan") == 3
        assert counter.op_calls("attention_with_scores") == (3 if implementation == "sdpa"
                                                             else 0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # said before the refusal
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated: the point
# The trace reads every property of the module, one of them deprecated by transformers.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("traced", ["pool", "pool, generic code", "timm", "transformers"])
def test_torch_jit_trace_is_refused_and_names_the_tracers_that_work(traced):
    # torch.jit.trace records PyTorch operators only: a pool call's kernels and host reads
    # would be replayed as constants, the traced input's result for every input (the
    # record of a bare pool call did so, with only TracerWarnings). Refused, naming what
    # traces it.
    if traced == "transformers":
        transformers = pytest.importorskip("transformers", reason="the patch needs transformers")
        from tokenpool_ops.transformers import patch_transformers

        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64,
                                        image_size=32, patch_size=8, num_labels=5)
        function, x = patch_transformers(transformers.ViTForImageClassification(config).eval(),
                                         [12, 6], "wkmedoids"), images()
    elif traced == "timm":
        function, x = tiny_vit("wkmedoids"), images()
    else:
        fast_paths = traced == "pool"
        x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))

        def function(tokens: torch.Tensor) -> torch.Tensor:
            return tokenpool_ops.pool(tokens, 5, "kmedoids", fast_paths=fast_paths)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record.*"
                                        r"torch.export.export or torch.compile"):
        torch.jit.trace(function, x, strict=False)


# ---------------------------------------------------------------------------------------------
# torch.export


@pytest.mark.parametrize("method", ["wkmedoids", "tome"])
def test_export_gives_the_eager_logits(method):
    model, x = tiny_vit(method), images()
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,))
        got = program.module()(x)
        again = model(x)  # export leaves the model as it was: one state for all blocks
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert all(block._tp_state is model._tokenpool for block in model.blocks)
    if numba_installed():
        target = torch.ops.tokenpool_ops.plan.default
        calls = sum(node.target == target for module in program.graph_module.modules()
                    if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes)
        assert calls == len(SCHEDULE)


def test_export_names_the_input_as_timm_does_for_a_dynamic_batch():
    # The patched forward keeps timm's signature, forward(x): a dynamic batch is named by
    # it, and the program gives the eager logits at other batch sizes too.
    model, x = tiny_vit("wkmedoids"), images(batch=3)
    batch = torch.export.Dim("batch", min=1, max=16)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        for size in (3, 2, 5):
            given = images(batch=size, seed=size)
            torch.testing.assert_close(program.module()(given), model(given), rtol=1e-5,
                                       atol=1e-5)


LOAD_AND_RUN = """
import sys, torch
import tokenpool_ops.nn  # registers the operators, as the README says
program = torch.export.load(sys.argv[1])
torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_a_saved_program_loads_in_a_fresh_process_after_importing_tokenpool_ops_nn(tmp_path):
    # A deployment process loads the saved program without timm or the patch: importing
    # tokenpool_ops.nn registers the operators the program calls.
    model, x = tiny_vit("wkmedoids"), images()
    with torch.no_grad():
        want = model(x)
        torch.export.save(torch.export.export(model, (x,)), tmp_path / "pooled.pt2")
    torch.save(x, tmp_path / "images.pt")
    env = dict(os.environ, PYTHONPATH=checkout_first(os.environ.get("PYTHONPATH")))
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path / "pooled.pt2"),
                           str(tmp_path / "images.pt"), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The custom operators


def _kmedoids_args(rng: np.random.Generator, dtype: torch.dtype = torch.float64,
                   n: int = 20, k: int = 5) -> tuple[Any, ...]:
    x = torch.as_tensor(rng.normal(size=(3, n, 4)), dtype=dtype)
    init = torch.as_tensor(np.stack([rng.permutation(n)[:k] for _ in range(3)]))
    weights = torch.as_tensor(rng.random((3, n)), dtype=dtype)
    return x, x.mean(dim=1, keepdim=True), init, weights


def _generic_kmedoids(x, mean, init, weights, max_iter):
    """The generic loop's result with stop_early=False, by the generic primitives."""
    import array_api_compat.torch as xp

    from tokenpool_ops._clustering import run_kmedoids
    from tokenpool_ops._primitives import Primitives

    prims = Primitives(xp)
    return run_kmedoids(prims, prims.self_sq_distances(xp, x - mean), init, weights, max_iter,
                        False)


@pytest.mark.parametrize("with_numba", [True, False])
def test_kmedoids_op_passes_opcheck_and_equals_the_generic_loop(with_numba, rng):
    if with_numba and not numba_installed():
        pytest.skip("numba is not installed: the operator's kernel route cannot be taken")
    args = _kmedoids_args(rng)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_torch_ops, "_numba_available", lambda: with_numba)
        torch.library.opcheck(torch.ops.tokenpool_ops.kmedoids, (*args, 6, True))
        labels, medoids, history, count = torch.ops.tokenpool_ops.kmedoids(*args, 6, True)
    want = _generic_kmedoids(*args, 6)
    torch.testing.assert_close(labels, want.assignment, rtol=0, atol=0)
    torch.testing.assert_close(medoids, want.medoids, rtol=0, atol=0)
    torch.testing.assert_close(history, want.history, rtol=1e-10, atol=1e-10)
    assert history.shape == (3, 7) and count.shape == () and 1 <= int(count) <= 6


@pytest.mark.parametrize("with_fallback", [True, False])
def test_kmeans_op_passes_opcheck(with_fallback, rng):
    x, mean, init, weights = _kmedoids_args(rng)
    fallback = torch.ones_like(weights) if with_fallback else None
    torch.library.opcheck(torch.ops.tokenpool_ops.kmeans,
                          (x, mean, init, weights, fallback, 5, True))
    centres, labels, history, _ = torch.ops.tokenpool_ops.kmeans(x, mean, init, weights,
                                                                 fallback, 5, False)
    assert centres.shape == (3, 5, 4) and labels.shape == (3, 20) and history.shape == (3, 6)


@pytest.mark.parametrize("rows", [1, 5])
def test_weighted_means_op_passes_opcheck_and_equals_the_generic_means(rows, rng):
    values = torch.as_tensor(rng.normal(size=(3, 20, 4)))
    labels = torch.as_tensor(rng.integers(0, 5, size=(3, 20)))
    weights = torch.as_tensor(rng.integers(0, 3, size=(3, 20)).astype(np.float64))
    empty = torch.as_tensor(rng.normal(size=(3, rows, 4)))
    torch.library.opcheck(torch.ops.tokenpool_ops.weighted_means,
                          (values, labels, 5, weights, empty))
    got = torch.ops.tokenpool_ops.weighted_means(values, labels, 5, weights, empty)
    # Independent reference: a loop over clusters.
    want = empty.expand(3, 5, 4).clone()
    for b in range(3):
        for c in range(5):
            member = labels[b] == c
            total = weights[b, member].sum()
            if total > 0:
                want[b, c] = (weights[b, member, None] * values[b, member]).sum(0) / total
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cuda_route_of_the_ops_passes_opcheck(rng):
    # The CUDA branch of the operators, on the CPU: tensors routed as CUDA tensors and
    # _cupy's torch entries replaced by stand-ins that return the generic result (as the
    # kernel does) or decline (then the operator's PyTorch fallback runs).
    from tokenpool_ops.backends import _cupy, _torch

    calls = {"kmedoids": 0, "means": 0}

    def kmedoids_entry(x, mean, init, weights, max_iter, stop_early):
        calls["kmedoids"] += 1
        if calls["kmedoids"] % 2 == 0:
            return None  # declined: the operator's own fallback
        flat = _generic_kmedoids(x, mean, init, weights, max_iter)
        return flat.assignment, flat.medoids, flat.history, flat.history.new_tensor(max_iter)

    def means_entry(values, labels, k, weights, empty):
        calls["means"] += 1
        return None

    args = _kmedoids_args(rng, torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_torch, "_on_cuda", lambda tensor: True)
        patch.setattr(_cupy, "torch_kmedoids", kmedoids_entry)
        patch.setattr(_cupy, "torch_weighted_means", means_entry)
        torch.library.opcheck(torch.ops.tokenpool_ops.kmedoids, (*args, 4, False))
        labels = torch.randint(0, 5, (3, 20), generator=torch.Generator().manual_seed(0))
        torch.library.opcheck(torch.ops.tokenpool_ops.weighted_means,
                              (args[0], labels, 5, args[3], args[1]))
        kernel = torch.ops.tokenpool_ops.kmedoids(*args, 4, False)
        declined = torch.ops.tokenpool_ops.kmedoids(*args, 4, False)
    assert calls["kmedoids"] > 2 and calls["means"] > 0
    for got, want in zip(kernel, declined, strict=True):
        torch.testing.assert_close(got, want)


def test_traced_cuda_route_calls_the_plan_op_once_per_block(monkeypatch):
    # Under torch.compile, CUDA tensors with CuPy installed take each block's plan as one
    # operator, which calls the kernels (on the CPU: the CUDA route forced, the kernels'
    # entries stand-ins that decline, so the PyTorch code computes); the logits are the
    # eager ones.
    from tokenpool_ops.backends import _cupy, _torch

    model, x = tiny_vit("wkmedoids"), images()
    with torch.no_grad():
        want = model(x)
    monkeypatch.setattr(_torch, "_on_cuda", lambda tensor: True)
    monkeypatch.setattr(_torch, "CUPY_INSTALLED", True)
    for entry in ("torch_kmedoids", "torch_weighted_means", "torch_merge"):
        monkeypatch.setattr(_cupy, entry, lambda *args: None)
    counter = GraphCounter()
    with torch.no_grad():
        got = torch.compile(model, backend=counter, fullgraph=True)(x)
    assert len(counter.graphs) == 1 and counter.op_calls("plan") == len(SCHEDULE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "k", "lean", "with_sizes", "prefix"), [
    ("wkmedoids", 7, True, True, 1), ("kmeans", 7, True, False, 0),
    ("wkmeans", 7, False, True, 2), ("topk", 7, True, True, 1), ("importance", 5, False, True, 0),
    ("random", 7, True, False, 1), ("tome", 9, True, True, 1), ("kmedoids", 0, True, True, 1)])
def test_plan_op_passes_opcheck_and_packs_the_plan(method, k, lean, with_sizes, prefix, rng):
    # The operator is nn.plan (values unchecked, fixed iterations) of the tokens after the
    # prefix, packed into four tensors: the prefix and the pooled tokens as one sequence;
    # the fields the plan lacks come back empty, as plan_fields says.
    from tokenpool_ops.nn import plan

    x = torch.as_tensor(rng.normal(size=(3, prefix + 16, 4)), dtype=torch.float32)
    patches = x[:, prefix:]
    scores = torch.as_tensor(rng.random((3, 16)), dtype=torch.float32)
    sizes = torch.as_tensor(rng.integers(1, 4, size=(3, 16)), dtype=torch.float32)
    sizes = sizes if with_sizes else None
    metric = patches[..., :2] + 1 if method == "tome" else None
    args = (x, k, method, scores, sizes, metric, lean, None, 4, 0, True, prefix)
    torch.library.opcheck(torch.ops.tokenpool_ops.plan, args)
    sequence, out_sizes, assignment, medoids = torch.ops.tokenpool_ops.plan(*args)
    want = plan(patches, k, method, scores=scores, sizes=sizes, metric=metric, lean=lean,
                max_iter=4, check_values=False, stop_early=False)
    has_assignment, has_medoids = _torch_ops.plan_fields(method, k, lean)
    assert has_assignment == (want.assignment is not None)
    assert has_medoids == (want.medoids is not None)
    assert sequence.shape == (3, prefix + k, 4)
    torch.testing.assert_close(sequence[:, :prefix], x[:, :prefix], rtol=0, atol=0)
    torch.testing.assert_close(sequence[:, prefix:], want.tokens, rtol=0, atol=0)
    torch.testing.assert_close(out_sizes, want.sizes, rtol=0, atol=0)
    assert assignment.shape == (3, 16 if has_assignment else 0)
    assert medoids.shape == (3, k if has_medoids else 0)
    if has_assignment:
        torch.testing.assert_close(assignment, want.assignment, rtol=0, atol=0)
    if has_medoids:
        torch.testing.assert_close(medoids, want.medoids, rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_attention_with_scores_op_passes_opcheck_and_equals_a_reference(with_bias, rng):
    q, k, v = (torch.as_tensor(rng.normal(size=(2, 3, 6, 4)), dtype=torch.float32)
               for _ in range(3))
    bias = (torch.as_tensor(rng.random((2, 1, 1, 6)), dtype=torch.float32).log()
            if with_bias else None)
    torch.library.opcheck(torch.ops.tokenpool_ops.attention_with_scores,
                          (q, k, v, bias, 0.5, 2))
    out, scores = torch.ops.tokenpool_ops.attention_with_scores(q, k, v, bias, 0.5, 2)
    # Independent reference in float64: per problem and head, the softmax written out.
    q64, k64, v64 = q.double(), k.double(), v.double()
    logits = torch.einsum("bhqd,bhkd->bhqk", q64, k64) * 0.5
    if bias is not None:
        logits = logits + bias.double()
    weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(out, torch.einsum("bhqk,bhkd->bqhd", weights, v64).float(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, weights.sum(dim=(1, 2))[:, 2:].float(),
                               rtol=1e-5, atol=1e-6)


def test_attention_with_scores_traces_as_one_graph_without_the_operator(rng, monkeypatch):
    """Traced without the operator (no Numba, or fast paths off) a block's inference
    attention with scores is its PyTorch code: one graph, as eager in steps of one image."""
    import tokenpool_ops._patching as patching

    monkeypatch.setattr(patching, "ATTENTION_CHUNK", 1)  # eagerly: one image a step
    q, k, v = (torch.as_tensor(rng.normal(size=(3, 2, 5, 4)), dtype=torch.float32)
               for _ in range(3))
    bias = torch.as_tensor(rng.random((3, 1, 1, 5)), dtype=torch.float32).log()
    torch._dynamo.reset()
    traced = torch.compile(patching.attention_with_scores, fullgraph=True, backend="eager")
    out, scores = traced(q, k, v, bias, 0.5, 1)
    want_out, want_scores = patching.attention_with_scores(q, k, v, bias, 0.5, 1)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores, want_scores, rtol=1e-6, atol=1e-6)


def _merge_args(rng: np.random.Generator, with_fallback: bool) -> tuple[Any, ...]:
    x = torch.as_tensor(rng.normal(size=(3, 20, 4)), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, 6, size=(3, 20)))  # some clusters empty
    weights = torch.as_tensor(rng.integers(0, 3, size=(3, 20)), dtype=torch.float32)
    carried = torch.as_tensor(rng.integers(1, 4, size=(3, 20)), dtype=torch.float32)
    return (x, x.mean(dim=1, keepdim=True), labels, 7, weights,
            carried if with_fallback else None, carried)


@pytest.mark.parametrize("with_objective", [True, False])
@pytest.mark.parametrize("route", ["cpu", "cuda-kernel", "cuda-declined"])
def test_merge_op_passes_opcheck_and_equals_a_reference(route, with_objective, rng):
    # The CUDA route on the CPU: tensors routed as CUDA tensors and _cupy.torch_merge a
    # stand-in that returns the reference (as the kernel does) or declines.
    from tokenpool_ops.backends import _cupy, _torch

    args = _merge_args(rng, with_fallback=True)
    x, mean, labels, k, weights, fallback, carried = args
    # Independent reference: a loop over clusters (weights, then the sizes, then the mean).
    want_tokens, want_sizes = torch.empty(3, k, 4), torch.empty(3, k)
    for b in range(3):
        for c in range(k):
            member = labels[b] == c
            use = weights[b, member] if weights[b, member].sum() > 0 else fallback[b, member]
            want_tokens[b, c] = ((use[:, None] * x[b, member]).sum(0) / use.sum()
                                 if use.sum() > 0 else mean[b, 0])
            want_sizes[b, c] = carried[b, member].sum()
    # Eq. 13 of the means: each token's squared distance to its nearest mean, weighted.
    nearest = (x[:, :, None, :] - want_tokens[:, None, :, :]).square().sum(-1).amin(-1)
    want_objective = (weights * nearest).sum(1)
    calls = []

    def kernel(*given):
        calls.append(route)
        if route == "cuda-declined":
            return None
        return want_tokens, want_sizes, want_objective if given[-1] else None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_torch, "_on_cuda", lambda tensor: route != "cpu")
        patch.setattr(_cupy, "torch_merge", kernel)
        torch.library.opcheck(torch.ops.tokenpool_ops.merge, (*args, with_objective))
        tokens, sizes, objective = torch.ops.tokenpool_ops.merge(*args, with_objective)
    assert bool(calls) == (route != "cpu")
    torch.testing.assert_close(tokens, want_tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sizes, want_sizes, rtol=0, atol=0)
    if with_objective:
        torch.testing.assert_close(objective, want_objective, rtol=1e-5, atol=1e-6)
    else:
        assert objective.shape == (0,)


def test_traced_cuda_route_of_pool_calls_the_merge_op(monkeypatch):
    # pool() compiled on its own (no patched model, so no plan operator): with CuPy and CUDA
    # tensors the K-Medoids kernel and the merge kernel are one operator each in the graph
    # (on the CPU: the CUDA route forced, the kernels' entries stand-ins that decline).
    from tokenpool_ops.backends import _cupy, _torch

    from tokenpool_ops import pool

    x = torch.as_tensor(np.random.default_rng(3).normal(size=(2, 16, 8)), dtype=torch.float32)
    want = pool(x, 5, "kmedoids", stop_early=False)
    monkeypatch.setattr(_torch, "_on_cuda", lambda tensor: True)
    monkeypatch.setattr(_torch, "CUPY_INSTALLED", True)
    for entry in ("torch_kmedoids", "torch_weighted_means", "torch_merge"):
        monkeypatch.setattr(_cupy, entry, lambda *args: None)
    counter = GraphCounter()
    got = torch.compile(lambda t: pool(t, 5, "kmedoids"), backend=counter, fullgraph=True)(x)
    assert len(counter.graphs) == 1
    assert counter.op_calls("kmedoids") == 1 and counter.op_calls("merge") == 1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["wkmedoids", "topk", "tome"])
def test_the_cuda_attention_route_compiles_and_exports_on_the_cpu(method, monkeypatch):
    # Off MATERIALISED_DEVICES a block's attention is SDPA plus the Eq. 5 score pass
    # (received_attention), and after a CPU plan operator the token count is a size known by
    # its range only. That route on the CPU (materialised attention off, the Numba plan
    # operator on): one graph,
    # the eager logits, and an exported program that gives them too.
    import tokenpool_ops.timm as tp_timm

    if not numba_installed():
        pytest.skip("numba is not installed: no plan operator, so no sizes known by range")
    monkeypatch.setattr(tp_timm, "MATERIALISED_DEVICES", ())
    model, x = tiny_vit(method), images()
    counter = GraphCounter()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend=counter, fullgraph=True)(x)
        exported = torch.export.export(model, (x,)).module()(x)
    assert len(counter.graphs) == 1 and counter.op_calls("plan") == len(SCHEDULE)
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU (benchmarks/gpu_check.sh runs these; the tests above prove the same logic on
# the CPU, the CUDA route forced and the kernels stood in for)


def _plans_expected_on_cuda() -> int:
    """Plan operators per forward on CUDA: one a block where CuPy is there (the kernels run
    inside it), none without CuPy (the PyTorch code is traced)."""
    from tokenpool_ops.backends import _torch

    return len(SCHEDULE) if _torch.CUPY_INSTALLED else 0


@pytest.mark.parametrize("method", METHODS)
def test_gpu_inference_compiles_to_one_graph_with_the_eager_logits(method):
    device = cuda_or_skip()
    model, x = tiny_vit(method).to(device), images().to(device)
    counter = GraphCounter()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend=counter, fullgraph=True)(x)
    assert len(counter.graphs) == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counter.op_calls("plan") == _plans_expected_on_cuda()


@pytest.mark.parametrize("method", ["wkmedoids", "tome"])
def test_gpu_training_compiles_to_one_graph_with_the_eager_loss_and_gradients(method):
    device = cuda_or_skip()
    model, x = tiny_vit(method, training=True).to(device), images().to(device)
    counter = GraphCounter()
    losses, grads = eager_and_compiled_training_step(model, x, counter)
    assert len(counter.graphs) == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("fast_paths", [True, False], ids=["kernels", "generic"])
def test_gpu_inductor_with_cuda_graphs_gives_the_eager_logits(fast_paths):
    # mode="reduce-overhead": inductor's kernels replayed as one CUDA graph, the plan
    # operators (CuPy's kernels on the current stream) captured inside it; without the fast
    # paths the PyTorch code of the pooling is traced instead (on an H200 with torch 2.11 it
    # failed inside dynamo once, "dictionary changed size during iteration", when compiled
    # after the kernels' model in one process; not reproduced on the CPU).
    device = cuda_or_skip()
    torch._dynamo.reset()
    model = tiny_vit("wkmedoids", fast_paths=fast_paths).to(device)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for seed in (1, 1, 1, 2, 3):  # warm-up, recording, then replays with new images
            x = images(seed=seed).to(device)
            got = compiled(x).clone()  # a replay overwrites the graph's output
            torch.testing.assert_close(got, model(x), rtol=1e-3, atol=1e-4)
    assert not counters["graph_break"]


@pytest.mark.parametrize("method", ["wkmedoids", "tome"])
def test_gpu_export_gives_the_eager_logits(method):
    device = cuda_or_skip()
    model, x = tiny_vit(method).to(device), images().to(device)
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,))
        got = program.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gpu_ops_pass_opcheck_and_equal_their_cpu_route(rng):
    # The operators on CUDA tensors run CuPy's kernels (or decline to their PyTorch code);
    # their results equal the same operators on the CPU, whose route the tests above check
    # against references.
    device = cuda_or_skip()
    args = _kmedoids_args(rng, torch.float32)
    on_gpu = tuple(a.to(device) for a in args)
    torch.library.opcheck(torch.ops.tokenpool_ops.kmedoids, (*on_gpu, 4, False))
    for got, want in zip(torch.ops.tokenpool_ops.kmedoids(*on_gpu, 4, False),
                         torch.ops.tokenpool_ops.kmedoids(*args, 4, False), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    merge = _merge_args(rng, with_fallback=True)
    merge_gpu = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in merge)
    torch.library.opcheck(torch.ops.tokenpool_ops.merge, (*merge_gpu, True))
    for got, want in zip(torch.ops.tokenpool_ops.merge(*merge_gpu, True),
                         torch.ops.tokenpool_ops.merge(*merge, True), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    x = torch.as_tensor(rng.normal(size=(3, 17, 4)), dtype=torch.float32)
    scores = torch.as_tensor(rng.random((3, 16)), dtype=torch.float32)
    plan = (x, 7, "wkmedoids", scores, None, None, True, None, 4, 0, True, 1)
    plan_gpu = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in plan)
    torch.library.opcheck(torch.ops.tokenpool_ops.plan, plan_gpu)
    for got, want in zip(torch.ops.tokenpool_ops.plan(*plan_gpu),
                         torch.ops.tokenpool_ops.plan(*plan), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
