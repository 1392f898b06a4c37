"""Joint knowledge distillation: one compiled step for students and teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import StepRig, leaves, read_metrics, tiny_config

from lbq import losses
from lbq.train import train_and_evaluate


def _kd_config(**distill):
    config = tiny_config()
    config.distill.enabled = True
    config.distill.update(distill)
    return config


def test_stop_gradient_separates_teacher_and_student():
    """d(student loss)/d(teacher params) = 0 and d(teacher loss)/d(student params) = 0."""
    rig = StepRig(_kd_config(student_att=0.5, teacher_att=0.5))
    student, teacher = rig.networks[0], rig.networks[-1]
    images = (rig.batch["image"].astype(np.float32) - 127.0) / 64.0
    bits = rig.bits["student"]
    from lbq.quant.precision import Precision

    precision = Precision(bits[0], bits[1], jnp.ones_like(bits[0]))

    def forward(net, params, stats, p):
        (logits, feats), _ = net.model.apply(
            {"params": params, "batch_stats": stats}, images, p, train=True, mutable=["batch_stats"]
        )
        return logits, feats

    def loss_of(role, params):
        zs, fs = forward(student, params["student"], rig.state.batch_stats["student"], precision)
        zt, ft = forward(teacher, params["teacher"], rig.state.batch_stats["teacher"], None)
        own, peer = ((zs, fs), (zt, ft)) if role == "student" else ((zt, ft), (zs, fs))
        return losses.joint_loss(
            own[0],
            rig.batch["label"],
            [peer[0]],
            own[1],
            [peer[1]],
            ce_weight=1.0,
            kl_weight=1.0,
            attention_weight=0.5,
            temperature=2.0,
        )[0]

    g_student = jax.grad(lambda p: loss_of("student", p))(rig.state.params)
    g_teacher = jax.grad(lambda p: loss_of("teacher", p))(rig.state.params)
    assert all(np.all(x == 0) for x in leaves(g_student["teacher"]))
    assert all(np.all(x == 0) for x in leaves(g_teacher["student"]))
    assert any(np.any(x != 0) for x in leaves(g_student["student"]))
    assert any(np.any(x != 0) for x in leaves(g_teacher["teacher"]))


def test_one_step_updates_both_with_their_own_rates():
    rig = StepRig(_kd_config())
    rig.lr = {"student": jnp.float32(0.1), "teacher": jnp.float32(0.0)}
    state, metrics = rig.step()
    for name in ("student/loss", "teacher/loss", "student/kl", "teacher/kl", "teacher/lr"):
        assert name in metrics
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            leaves(rig.state.params["student"]), leaves(state.params["student"]), strict=True
        )
    ]
    assert any(changed)
    # Teacher lr 0 and no weight-decay step through the learning rate: teacher unchanged.
    for a, b in zip(
        leaves(rig.state.params["teacher"]), leaves(state.params["teacher"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_named_calls_label_each_network_in_the_compiled_step():
    """`jax.named_call` puts each network's ops, forward and backward, under a scope named for
    it: 'jit(train_step)/jvp(student)/CifarResNet/...'. Without it the same ops read
    'jit(train_step)/jvp(CifarResNet)/...'. The network names also appear in the argument
    locations (``state.params['student']...``) either way, so only the ops' scopes are read."""
    import re

    rig = StepRig(_kd_config())
    hparams = {"lr": rig.lr, "bits": rig.bits}
    text = rig.train_step.lower(rig.state, rig.batch, hparams).as_text(debug_info=True)
    scope_pairs = set()
    for name_stack in re.findall(r'loc\("([^"]*)"', text):
        # 'transpose(jvp(student))' -> 'student'
        parts = [re.sub(r"^(?:\w+\()+|\)+$", "", part) for part in name_stack.split("/")]
        scope_pairs.update(zip(parts[:-1], parts[1:], strict=True))
    for net in rig.networks:
        assert (net.name, type(net.model).__name__) in scope_pairs, net.name


@pytest.mark.slow
def test_joint_run_lowers_both_losses_and_evaluates_every_network(tmp_path):
    config = _kd_config()
    config.stages[0].steps = 24
    config.log_every_steps = 4
    config.schedule.lr = config.schedule.teacher_lr = 0.05
    config.distill.extra_students = ((4, 4),)
    result = train_and_evaluate(config, str(tmp_path))
    records = read_metrics(str(tmp_path), "train")
    for net in ("student", "teacher", "student_w4a4"):
        first, last = records[0][f"{net}/loss"], records[-1][f"{net}/loss"]
        assert last < first, (net, first, last)
        assert 0 <= result.final[net]["top1"] <= 1
    assert result.train_step_compilations == 1


@pytest.mark.slow
def test_frozen_teacher_from_checkpoint_stays_fixed(tmp_path):
    fp = tiny_config(steps=2)
    fp.model.quantized = False
    train_and_evaluate(fp, str(tmp_path / "teacher"))
    from lbq.checkpoint import load_variables

    trained = load_variables(str(tmp_path / "teacher"))["student"]
    config = _kd_config(teacher="frozen", teacher_init=str(tmp_path / "teacher"))
    train_and_evaluate(config, str(tmp_path / "kd"))
    after = load_variables(str(tmp_path / "kd"))["teacher"]
    for name in ("params", "batch_stats"):
        for a, b in zip(leaves(trained[name]), leaves(after[name]), strict=True):
            np.testing.assert_array_equal(a, b)
