"""Joint-distillation losses against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np

from lbq import losses


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(student, teacher, t):
    log_p = np_log_softmax(teacher / t)
    log_q = np_log_softmax(student / t)
    return t * t * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))


def np_attention(f):
    a = (f**2).sum(-1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


RNG = np.random.default_rng(0)
ZS = RNG.normal(size=(6, 10)).astype(np.float32) * 3
ZT = RNG.normal(size=(6, 10)).astype(np.float32) * 3
Y = RNG.integers(0, 10, 6).astype(np.int32)
FS = {
    "stage2": RNG.normal(size=(6, 8, 8, 4)).astype(np.float32),
    "stage3": RNG.normal(size=(6, 4, 4, 8)).astype(np.float32),
    "stage1": RNG.normal(size=(6, 16, 16, 2)).astype(np.float32),
}
FT = {k: RNG.normal(size=v.shape).astype(np.float32) for k, v in FS.items()}


def test_cross_entropy():
    want = -np.mean(np_log_softmax(ZS)[np.arange(6), Y])
    np.testing.assert_allclose(losses.cross_entropy(ZS, Y), want, rtol=1e-6)


def test_kl_with_temperature():
    for t in (1.0, 2.0, 4.0):
        np.testing.assert_allclose(losses.distillation_kl(ZS, ZT, t), np_kl(ZS, ZT, t), rtol=1e-5)
    np.testing.assert_allclose(losses.distillation_kl(ZS, ZS, 3.0), 0.0, atol=1e-6)


def test_attention_transfer_on_the_last_two_stages():
    last = losses.last_stages(FS)
    assert sorted(last) == ["stage2", "stage3"]
    want = sum(
        np.mean(np.linalg.norm(np_attention(FS[k]) - np_attention(FT[k]), axis=-1))
        for k in ("stage2", "stage3")
    )
    got = losses.attention_transfer(last, losses.last_stages(FT))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_joint_loss_weights_terms():
    loss, terms = losses.joint_loss(
        ZS, Y, [ZT], FS, [FT], ce_weight=0.7, kl_weight=0.7, attention_weight=0.3, temperature=2.0
    )
    ce = -np.mean(np_log_softmax(ZS)[np.arange(6), Y])
    kl = np_kl(ZS, ZT, 2.0)
    att = float(terms["att"])
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(terms["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * ce + 0.7 * kl + 0.3 * att, rtol=1e-5)
    # Weight 0 drops the attention term: the released code's loss.
    plain, plain_terms = losses.joint_loss(
        ZS, Y, [ZT], FS, [FT], ce_weight=0.7, kl_weight=0.7, attention_weight=0.0, temperature=2.0
    )
    assert "att" not in plain_terms
    np.testing.assert_allclose(plain, 0.7 * ce + 0.7 * kl, rtol=1e-5)


def test_targets_get_no_gradient():
    g = jax.grad(lambda zt: losses.distillation_kl(jnp.asarray(ZS), zt, 2.0))(jnp.asarray(ZT))
    np.testing.assert_array_equal(g, 0.0)
    g = jax.grad(lambda ft: losses.attention_transfer(FS, ft))(FT)
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g))
