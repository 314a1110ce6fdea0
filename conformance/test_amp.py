"""Automatic mixed precision conformance: autocast and GradScaler behave as documented.

Mixed precision is only safe when three promises hold on this node's stack:

* autocast follows its op lists: ops on the device's lower-precision list run in the low
  dtype and give exactly what the op gives on inputs cast by hand; ops on the fp32 list run
  in fp32 (the CPU and CUDA lists differ, each device is checked against its own);
* the rounding that follows stays small: a transformer-like block's outputs and gradients
  are within the tolerance table's relative-L2 bound of a true fp32 reference (TF32 off on
  CUDA), and a short training run's loss tracks fp32 within ``loss_rel``;
* GradScaler skips steps with inf/NaN gradients without touching parameters or optimizer
  state, backs off and grows its scale exactly, refuses a second ``unscale_``, and (with
  SGD and Adam, foreach and fused) otherwise trains like an unscaled run.

And autocast must actually save memory: the activations kept after forward, relative to
fp32, stay at the analytic size of storing them in 2 bytes.
"""

from __future__ import annotations

import pytest

from pytest_gpuconform.checks import bitwise_reproducible, true_fp32

LOW_DTYPES = ("fp16", "bf16")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- op lists ------------------------------------------------------------------------------


def _lower_precision_ops(device_type: str):
    """(name, fn, fp32 args) for ops on the device's autocast lower-precision list."""
    import torch
    import torch.nn.functional as F

    r = torch.randn
    common = [
        ("mm", torch.mm, (r(8, 16), r(16, 12))),
        ("matmul", torch.matmul, (r(4, 8, 16), r(16, 12))),
        ("bmm", torch.bmm, (r(4, 8, 16), r(4, 16, 12))),
        ("addmm", torch.addmm, (r(8, 12), r(8, 16), r(16, 12))),
        ("baddbmm", torch.baddbmm, (r(4, 8, 12), r(4, 8, 16), r(4, 16, 12))),
        ("addbmm", torch.addbmm, (r(8, 12), r(4, 8, 16), r(4, 16, 12))),
        ("linear", F.linear, (r(8, 16), r(12, 16), r(12))),
        ("conv1d", F.conv1d, (r(2, 4, 16), r(6, 4, 3))),
        ("conv2d", F.conv2d, (r(2, 4, 8, 8), r(6, 4, 3, 3))),
        ("conv_transpose2d", F.conv_transpose2d, (r(2, 4, 8, 8), r(4, 6, 3, 3))),
        ("prelu", F.prelu, (r(2, 4, 8), torch.rand(4))),
    ]
    if device_type == "cuda":
        common += [
            ("addmv", torch.addmv, (r(8), r(8, 16), r(16))),
            ("addr", torch.addr, (r(8, 12), r(8), r(12))),
            ("mv", torch.mv, (r(8, 16), r(16))),
            ("einsum", lambda a, b: torch.einsum("ij,jk->ik", a, b), (r(8, 16), r(16, 12))),
        ]
    return common


def _fp32_ops(device_type: str):
    """(name, fn, fp32 args) for ops on the device's autocast fp32 list (fed low-dtype inputs).

    Only ops autocast casts to fp32 (CastPolicy fp32) are used: for those, "bitwise equal to
    the op on inputs cast by hand" holds by construction. Ops that autocast instead runs with
    ``dtype=float32`` (softmax, sum, cumsum on CUDA) may reduce in another order than on
    fp32 inputs, and CUDA nll_loss and cumsum have no deterministic kernel. Lists follow
    torch/testing/_internal/autocast_test_lists.py (CUDA and CPU differ)."""
    import torch
    import torch.nn.functional as F

    r = torch.randn
    sign = lambda *s: torch.randn(*s).sign()  # noqa: E731
    losses = [
        ("mse_loss", F.mse_loss, (r(8, 16), r(8, 16))),
        ("l1_loss", F.l1_loss, (r(8, 16), r(8, 16))),
        ("smooth_l1_loss", F.smooth_l1_loss, (r(8, 16), r(8, 16))),
        ("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, (r(8, 16), torch.rand(8, 16))),
        ("soft_margin_loss", F.soft_margin_loss, (r(8, 16), sign(8, 16))),
    ]
    if device_type == "cuda":
        positive = torch.rand(8, 16) + 0.5
        return losses + [
            ("exp", torch.exp, (r(8, 16),)),
            ("log", torch.log, (positive,)),
            ("log1p", torch.log1p, (positive,)),
            ("reciprocal", torch.reciprocal, (positive,)),
            ("rsqrt", torch.rsqrt, (positive,)),
            ("pow", torch.pow, (positive, 2.5)),
            ("layer_norm", lambda x: F.layer_norm(x, (16,)), (r(8, 16),)),
        ]
    return losses + [
        ("huber_loss", F.huber_loss, (r(8, 16), r(8, 16))),
        ("nll_loss", F.nll_loss, (r(8, 5).log_softmax(1), torch.randint(0, 5, (8,)))),
        ("margin_ranking_loss", F.margin_ranking_loss, (r(8), r(8), sign(8))),
        ("cosine_embedding_loss", F.cosine_embedding_loss, (r(8, 16), r(8, 16), sign(8))),
        ("poisson_nll_loss", F.poisson_nll_loss, (r(8, 16), torch.rand(8, 16))),
    ]


def _cast(args, dtype, device):
    import torch

    return tuple(
        a.to(device=device, dtype=dtype)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a.to(device)
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    )


def _check_ops(ops, device, dtype, in_dtype, want_dtype, record, list_name):
    """Each op under autocast: output dtype ``want_dtype`` and bitwise equal to the op on inputs
    cast to ``want_dtype`` by hand (autocast off)."""
    import torch

    from pytest_gpuconform.checks import mismatch

    problems = []
    with bitwise_reproducible(device, record):  # same kernels on both sides (recorded on CUDA)
        for name, fn, args in ops:
            inputs = _cast(args, in_dtype, device)
            with torch.autocast(device.type, dtype=dtype):
                out = fn(*inputs)
            if out.dtype != want_dtype:
                problems.append(f"{name} gave {out.dtype} (expected {want_dtype})")
                continue
            with torch.autocast(device.type, enabled=False):
                reference = fn(*_cast(inputs, want_dtype, device))
            problem = mismatch(out, reference, f"{name} vs {name} on inputs cast to {want_dtype} by hand")
            if problem:
                problems.append(problem)
    record("ops_checked", len(ops))
    record("ops_failed", len(problems))
    record("ops_failed_max", 0)
    assert not problems, (
        f"autocast({device.type}, {dtype}) {list_name} list: {len(problems)} of {len(ops)} ops wrong: "
        + "; ".join(problems)
    )


@pytest.mark.dtype(*LOW_DTYPES)
def test_autocast_lower_precision_ops(device, dtype, record):
    """Ops on the device's lower-precision list run in ``dtype``, bitwise as a manual cast."""
    import torch

    torch.manual_seed(0)
    _check_ops(_lower_precision_ops(device.type), device, dtype, torch.float32, dtype, record, "lower-precision")


@pytest.mark.dtype(*LOW_DTYPES)
def test_autocast_fp32_ops(device, dtype, record):
    """Ops on the device's fp32 list run in fp32 even on low-precision inputs, bitwise as a
    manual cast to fp32."""
    import torch

    torch.manual_seed(0)
    _check_ops(_fp32_ops(device.type), device, dtype, dtype, torch.float32, record, "fp32")


# -- model level ---------------------------------------------------------------------------


def _block_and_input(device):
    import torch

    from ._models import TinyTransformerBlock

    torch.manual_seed(3)
    block = TinyTransformerBlock(width=64).to(device)
    x = torch.randn(8, 16, 64, device=device, requires_grad=True)
    grad_out = torch.randn(8, 16, 64, device=device)
    return block, x, grad_out


def _block_run(block, x, grad_out, autocast_dtype=None):
    """Output, input grad and param grads; records each Linear's output dtype."""
    import torch

    block.zero_grad(set_to_none=True)
    x.grad = None
    linear_dtypes = {}
    hooks = [
        m.register_forward_hook(lambda m, _i, out, name=name: linear_dtypes.__setitem__(name, out.dtype))
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = block(x)
        out.float().backward(grad_out)
    finally:
        for hook in hooks:
            hook.remove()
    tensors = {"output": out.detach(), "input grad": x.grad}
    tensors.update({f"grad of {name}": p.grad for name, p in block.named_parameters()})
    return tensors, linear_dtypes


@pytest.mark.dtype(*LOW_DTYPES)
def test_autocast_block_matches_fp32(device, dtype, tolerance, record):
    """A transformer-like block under autocast: Linears run in ``dtype``, and the output and
    every gradient are within the table's rel-L2 bound of the fp32 reference."""
    from pytest_gpuconform.checks import relative_l2

    block, x, grad_out = _block_and_input(device)
    with true_fp32(device, record):
        want, _ = _block_run(block, x, grad_out)
    got, linear_dtypes = _block_run(block, x, grad_out, autocast_dtype=dtype)

    not_low = {name: str(dt) for name, dt in linear_dtypes.items() if dt != dtype}
    assert not not_low, (
        f"autocast({device.type}, {dtype}): Linear outputs {not_low} (expected {dtype}): autocast did not run "
        f"the block in low precision"
    )
    errors = {name: relative_l2(got[name].float(), want[name]) for name in want}
    worst = max(errors, key=errors.get)
    record("output_rel_l2", errors["output"])
    record("max_grad_rel_l2", max(v for k, v in errors.items() if k != "output"))
    record("worst_tensor", worst)
    record("rel_l2_bound", tolerance.rel_l2)
    over = [f"{name} {err:.3g}" for name, err in errors.items() if not err <= tolerance.rel_l2]
    assert not over, (
        f"autocast({device.type}, {dtype}) vs fp32: rel-L2 error above bound {tolerance.rel_l2:g} for "
        f"{len(over)} of {len(errors)} tensors: " + ", ".join(over[:6])
    )


TRAIN_STEPS = 8


def _train_losses(device, autocast_dtype=None):
    """Per-step losses of a short Adam run of TinyRegressor; fp16 uses a GradScaler, as a
    real fp16 run must (bf16 has fp32's range and needs none)."""
    import torch

    from ._models import TinyRegressor

    torch.manual_seed(5)
    model = TinyRegressor(width=64).to(device)
    data = torch.randn(TRAIN_STEPS, 16, 8, 64, device=device)
    targets = data.mean(dim=-1).sin()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=autocast_dtype is torch.float16)
    losses, scales = [], []
    for step in range(TRAIN_STEPS):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.mse_loss(model(data[step]).float(), targets[step])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return losses, scales


@pytest.mark.dtype(*LOW_DTYPES)
def test_autocast_training_tracks_fp32(device, dtype, tolerance, record):
    """A few Adam steps under autocast: every step's loss within ``loss_rel`` of fp32's."""
    with true_fp32(device, record):
        want, _ = _train_losses(device)
    got, scales = _train_losses(device, autocast_dtype=dtype)
    record("scaler_backoffs", sum(later < earlier for earlier, later in zip(scales, scales[1:], strict=False)))
    rel = [abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)]
    worst_step = max(range(len(rel)), key=rel.__getitem__)
    record("max_loss_rel_diff", rel[worst_step])
    record("worst_step", worst_step)
    record("loss_rel_bound", tolerance.loss_rel)
    record("final_loss_fp32", want[-1])
    record("final_loss_autocast", got[-1])
    assert rel[worst_step] <= tolerance.loss_rel, (
        f"autocast({device.type}, {dtype}) training: step {worst_step} loss {got[worst_step]:.6g} vs fp32 "
        f"{want[worst_step]:.6g}: relative difference {rel[worst_step]:.3g} > bound loss_rel {tolerance.loss_rel:g}"
    )


# -- GradScaler ----------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "sgd_foreach", "sgd_fused", "adam", "adam_foreach", "adam_fused")
SKIP_STEP = 1  # the second of four steps gets a non-finite gradient
INIT_SCALE = 128.0
EXPECTED_SCALES = [256.0, 128.0, 256.0, 512.0]  # grow, back off, grow, grow: 128 * 2**3 * 0.5**1


def _make_optimizer(kind: str, params):
    import torch

    name, _, impl = kind.partition("_")
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    kwargs = {"lr": 0.1 if name == "sgd" else 0.01}
    if name == "sgd":
        kwargs["momentum"] = 0.9
    if impl == "foreach":
        kwargs["foreach"] = True
    elif impl == "fused":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = False
    return cls(params, **kwargs)


def _scaling_pair(device, kind):
    """Two identical Linear-Linear models with their optimizers (scaled run and control)."""
    import torch

    torch.manual_seed(9)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(device)
    pair = []
    for _ in range(2):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(device)
        model.load_state_dict(base.state_dict())
        try:
            pair.append((model, _make_optimizer(kind, model.parameters())))
        except (RuntimeError, ValueError) as exc:
            pytest.skip(f"{kind} optimizer not available on {device} in torch {torch.__version__}: {exc}")
    return pair


def _state_snapshot(model, optimizer):
    import torch

    snap = {f"param {name}": p.detach().clone() for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                snap[f"optimizer {key} of {names[id(p)]}"] = value.detach().clone()
    return snap


@pytest.mark.dtype(*LOW_DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_grad_scaler_skips_nonfinite_and_rescales(device, dtype, optimizer, tolerance, record):
    """Scaled run with an inf (then a NaN) injected at step 2 of 4: that step changes no
    parameter and no optimizer state, the scale goes 256, 128, 256, 512, and the other
    steps train like an unscaled control run that skips the same step. Scaling by a power of
    two is exact in fp16/bf16 until values under- or overflow, so the two runs may differ only
    where the control's low-precision gradients were subnormal: bounded by the dtype's atol."""
    import torch

    from pytest_gpuconform.checks import mismatch, not_close

    torch.manual_seed(10)
    batches = [(torch.randn(16, 8, device=device), torch.randn(16, 8, device=device)) for _ in range(4)]
    for bad in ("inf", "nan"):
        (model, opt), (control, control_opt) = _scaling_pair(device, optimizer)
        scaler = torch.amp.GradScaler(
            device.type, init_scale=INIT_SCALE, growth_factor=2.0, backoff_factor=0.5, growth_interval=1
        )
        scales = []
        for step, (x, target) in enumerate(batches):
            for m, o in ((model, opt), (control, control_opt)):
                o.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype):
                    loss = torch.nn.functional.mse_loss(m(x).float(), target)
                if m is control:
                    loss.backward()
                    if step != SKIP_STEP:
                        o.step()
                    continue
                scaler.scale(loss).backward()
                if step == SKIP_STEP:
                    with torch.no_grad():
                        model[1].weight.grad[0, 0] = float(bad)
                    before = _state_snapshot(model, opt)
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
                if step == SKIP_STEP:
                    after = _state_snapshot(model, opt)
                    changed = [p for p in (mismatch(after[k], v, k) for k, v in before.items()) if p]
                    changed += [f"{k}: created by the skipped step" for k in after.keys() - before.keys()]
                    assert not changed, (
                        f"GradScaler({device.type}) + {optimizer}, {bad} gradient at step {step + 1}: the step was "
                        f"not skipped: " + "; ".join(changed[:3])
                    )
        record(f"scales_{bad}", ",".join(f"{s:g}" for s in scales))
        assert scales == EXPECTED_SCALES, (
            f"GradScaler({device.type}) + {optimizer}, {bad} at step {SKIP_STEP + 1} of 4: scale after each step "
            f"{scales} (expected {EXPECTED_SCALES}: init {INIT_SCALE:g}, growth 2 every step, backoff 0.5)"
        )
        worst = max(
            float((p - c).detach().abs().max()) for p, c in zip(model.parameters(), control.parameters(), strict=True)
        )
        record(f"max_param_diff_vs_control_{bad}", worst)
        off = [
            o
            for o in (
                not_close(p, c, tolerance.rtol, tolerance.atol, f"param {name}")
                for (name, p), c in zip(model.named_parameters(), control.parameters(), strict=True)
            )
            if o
        ]
        assert not off, (
            f"GradScaler({device.type}) + {optimizer} ({dtype}), {bad} at step {SKIP_STEP + 1}: after 4 steps the "
            f"scaled run differs from the unscaled control: " + "; ".join(off[:3])
        )


def test_grad_scaler_unscale_twice_raises(device, record):
    """unscale_ twice before update() must raise, not divide the gradients twice."""
    import torch

    model = torch.nn.Linear(4, 4).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, init_scale=64.0)
    scaler.scale(model(torch.ones(2, 4, device=device)).sum()).backward()
    scaler.unscale_(opt)
    once = model.weight.grad.clone()
    try:
        scaler.unscale_(opt)
    except RuntimeError:
        record("raised", "RuntimeError")
        return
    ratio = float(model.weight.grad.abs().sum() / once.abs().sum())
    record("raised", "nothing")
    pytest.fail(
        f"GradScaler({device.type}): second unscale_ before update() raised nothing (expected RuntimeError); "
        f"gradients are now {ratio:.4g}x the unscaled ones (expected 1)",
        pytrace=False,
    )


# -- memory --------------------------------------------------------------------------------

AMP_MEMORY_SLACK = 0.01


@pytest.mark.dtype(*LOW_DTYPES)
def test_autocast_activation_memory(device, dtype, memory_meter, record):
    """Bytes kept after forward under autocast, relative to fp32, are at most the analytic
    ratio for 2-byte activations plus the cast weight copies."""
    import torch

    from . import _models

    n_blocks, width, batch = 8, 64, 256
    torch.manual_seed(2)
    model = _models.mlp_blocks(n_blocks, width).to(device)
    x = torch.randn(batch, width, device=device, requires_grad=True)

    def kept_after_forward(autocast_dtype):
        enabled = autocast_dtype is not None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
            model(x).float().sum().backward()  # warm-up (lazy init, workspaces)
        model.zero_grad(set_to_none=True)
        # A fresh autocast context: its weight-cast cache starts empty, so the casts are counted.
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
            with memory_meter.track(device) as reading:
                out = model(x)
                kept = reading.live_bytes, reading.cuda_allocated_bytes
            del out
        return kept

    with true_fp32(device):
        fp32, cuda_fp32 = kept_after_forward(None)
    low, cuda_low = kept_after_forward(dtype)
    analytic = _models.autocast_bytes(n_blocks, batch, width, 2) / (_models.plain_units(n_blocks) * batch * width * 4)
    bound = analytic + AMP_MEMORY_SLACK
    ratio = low / fp32
    record("fp32_activation_bytes", fp32)
    record("autocast_activation_bytes", low)
    record("activation_ratio", ratio)
    record("activation_ratio_bound", bound)
    assert ratio <= bound, (
        f"autocast({device.type}, {dtype}): activation ratio autocast/fp32 {ratio:.4f} ({low} B / {fp32} B kept "
        f"after forward) > bound {bound:.4f} (analytic {analytic:.4f} + {AMP_MEMORY_SLACK})"
    )
    if cuda_fp32 is not None:
        cuda_ratio = cuda_low / cuda_fp32
        record("cuda_activation_ratio", cuda_ratio)
        assert cuda_ratio <= bound, (
            f"autocast({device.type}, {dtype}): CUDA allocator ratio autocast/fp32 {cuda_ratio:.4f} "
            f"({cuda_low} B / {cuda_fp32} B) > bound {bound:.4f}"
        )
