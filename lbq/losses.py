"""Losses of joint knowledge distillation (SPEC section 4)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def distillation_kl(
    logits: jax.Array, target_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``T^2 * KL(softmax(target/T) || softmax(logits/T))``, averaged over the batch.

    The target is treated as a constant: no gradient flows into ``target_logits``.
    """
    t = temperature
    target = jax.lax.stop_gradient(target_logits.astype(jnp.float32)) / t
    log_p = jax.nn.log_softmax(target)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / t)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return t * t * jnp.mean(kl)


def attention_map(feature: jax.Array) -> jax.Array:
    """Attention of a feature map [B, H, W, C]: ``sum_c A^2``, flattened, L2-normalised."""
    att = jnp.sum(jnp.square(feature.astype(jnp.float32)), axis=-1).reshape(feature.shape[0], -1)
    return att / jnp.maximum(jnp.linalg.norm(att, axis=-1, keepdims=True), 1e-12)


def attention_transfer(
    features: Mapping[str, jax.Array], target_features: Mapping[str, jax.Array]
) -> jax.Array:
    """Sum over feature maps of the batch-mean L2 distance between attention maps.

    The target side is a constant (stop-gradient).
    """
    total = jnp.float32(0.0)
    for name, feature in features.items():
        target = jax.lax.stop_gradient(attention_map(target_features[name]))
        total += jnp.mean(jnp.linalg.norm(attention_map(feature) - target, axis=-1))
    return total


def last_stages(features: Mapping[str, jax.Array], count: int = 2) -> dict[str, jax.Array]:
    """The outputs of the last ``count`` stages (by sorted stage name)."""
    return {k: features[k] for k in sorted(features)[-count:]}


def joint_loss(
    logits: jax.Array,
    labels: jax.Array,
    peer_logits: list[jax.Array],
    features: Mapping[str, jax.Array],
    peer_features: list[Mapping[str, jax.Array]],
    *,
    ce_weight: float,
    kl_weight: float,
    attention_weight: float,
    temperature: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One network's loss in joint distillation.

    ``ce_weight * CE + kl_weight * T^2 KL(peer || self) + attention_weight * L_att``,
    where the KL and attention terms are averaged over the peers (one peer for a student: the
    teacher; every student for the teacher). Peers are constants.

    Returns:
      (loss, {'ce', 'kl', 'att'} terms).
    """
    ce = cross_entropy(logits, labels)
    kl = jnp.mean(jnp.stack([distillation_kl(logits, p, temperature) for p in peer_logits]))
    terms = {"ce": ce, "kl": kl}
    loss = ce_weight * ce + kl_weight * kl
    if attention_weight:
        att = jnp.mean(
            jnp.stack(
                [attention_transfer(last_stages(features), last_stages(f)) for f in peer_features]
            )
        )
        terms["att"] = att
        loss = loss + attention_weight * att
    return loss, terms
