"""Training state and the per-device training iteration of the seed's BCE GAN game.

`train_step` is a pure function of (state, real batch, rng); mapping it over devices is the
caller's (`parallel.map_over_devices`, or `jax.pmap(..., axis_name=...)`), with pmap's semantics:
gradients per device, averaged here. Collectives appear only behind `axis_name`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.training import train_state

from cspgan_jax import losses, models, optim, param_copies


class ModelState(train_state.TrainState):
  """One network: params, its optax state, and BatchNorm statistics (`{}` when it has none).

  `compute_params`: in bf16, the convolutions' parameters rounded to bf16 by the step that
  updated them (`param_copies`; not checkpointed), None in float32."""
  batch_stats: Any = None
  compute_params: Any = None

  def with_compute_params(self, dtype) -> "ModelState":
    return self.replace(compute_params=param_copies.make(self.params, dtype))


class GANState(struct.PyTreeNode):
  """Everything a training run carries from one iteration to the next."""
  step: jax.Array
  g: ModelState
  d: ModelState

  def with_compute_params(self, dtype) -> "GANState":
    """Both networks' `compute_params` made from their parameters (None for float32)."""
    return self.replace(g=self.g.with_compute_params(dtype), d=self.d.with_compute_params(dtype))

  def without_compute_params(self) -> "GANState":
    """What a checkpoint holds: the copies are made again from the parameters on restore."""
    return self.with_compute_params(jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
  """The convolutions' dtype (`config.train.dtype`). Parameters, Adam state, BatchNorm
  statistics and losses stay float32; "float32" is the default and the parity mode."""
  return DTYPES[config.train.get("dtype", "float32")]


def make_optimizer(lr: float, train_config) -> optax.GradientTransformation:
  """Adam(lr, betas=(beta1, beta2), eps): `torch_adam` (PyTorch's rounding) or optax's."""
  t = train_config
  if t.optimizer == "torch_adam":
    return optim.torch_adam(lr, b1=t.beta1, b2=t.beta2, eps=t.adam_eps)
  return optax.adam(lr, b1=t.beta1, b2=t.beta2, eps=t.adam_eps)


def init_variables(config, rng):
  """Fresh Flax variables {'params', 'batch_stats'} for G and D (DCGAN init in distribution).

  One compiled program per model config and platform (memoised; the persistent compilation
  cache keeps it across runs). Run op by op, flax's init compiled each initializer's random
  draw and each layer of the forward pass it traces as programs of their own: about 150 of
  them, 13-20 s on a 2-core CPU before the first step. Jitted, the forward pass is dead code.
  """
  model_config = ml_collections.FrozenConfigDict(config.model)
  if isinstance(rng, jax.core.Tracer):  # inside eval_shape or a jit: part of that program
    return _init_variables(model_config, rng)
  return _variables_initializer(model_config, jax.default_backend())(rng)


def variable_shapes(config):
  """What `init_variables` returns, as shapes and dtypes only (nothing computed): the template
  a conversion from PyTorch's `state_dict` fills."""
  return jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0)))


@functools.lru_cache(maxsize=None)
def _variables_initializer(model_config, platform: str):
  # The program runs once per run, so XLA:CPU need not optimise it: at its default level LLVM
  # spends 7 of the 8 s (tiny config) compiling threefry's unrolled rounds; at 0 it compiles in
  # 1.6 s and runs in 6 ms (baseline: 2.9 s and 2.3 s against 10.5 s and 0.5 s).
  options = {"xla_backend_optimization_level": 0} if platform == "cpu" else None
  return jax.jit(functools.partial(_init_variables, model_config), compiler_options=options)


def _init_variables(model_config, rng):
  gen, disc = models.build_models(model_config)
  r = model_config.resolution
  g_rng, d_rng = jax.random.split(rng)
  g_vars = gen.init(g_rng, jnp.zeros((2, model_config.nz)), train=False)
  d_vars = disc.init(d_rng, jnp.zeros((2, r, r, model_config.nc)), train=False)
  return dict(g_vars), dict(d_vars)


def create_state(config, g_vars, d_vars) -> GANState:
  """A step-0 state from given variables, with fresh Adam states."""
  gen, disc = models.build_models(config.model)
  t = config.train

  def model_state(module, variables, lr):
    return ModelState.create(apply_fn=module.apply, params=variables["params"],
                             tx=make_optimizer(lr, t),
                             batch_stats=variables.get("batch_stats", {})).replace(
                                 step=jnp.zeros((), jnp.int32)  # a stable dtype to checkpoint
                                 ).with_compute_params(compute_dtype(config))

  return GANState(step=jnp.zeros((), jnp.int32), g=model_state(gen, g_vars, t.lr_g),
                  d=model_state(disc, d_vars, t.lr_d))


def init_state(config, rng) -> GANState:
  return create_state(config, *init_variables(config, rng))


def _apply(module: nn.Module, params, batch_stats, x, train: bool = True, copies=None,
           capture: bool = False, **kwargs):
  """module(x) in training mode; returns (output, updated batch_stats, layers). With `copies`
  (a `ModelState.compute_params`) the convolutions read those, the gradient going to `params`.
  `layers`: with `capture`, flax's "intermediates" (every submodule's output), else {}."""
  params = param_copies.use(params, copies)
  out, mutated = module.apply({"params": params, "batch_stats": batch_stats}, x, train=train,
                              mutable=["batch_stats", "intermediates"] if capture else
                              ["batch_stats"], capture_intermediates=capture, **kwargs)
  return out, mutated.get("batch_stats", {}), mutated.get("intermediates", {})


def train_step_with_noise(state: GANState, real, z, *, config, axis_name: Optional[str] = None,
                          capture: bool = False):
  """One seed iteration with explicit latents z (b, nz); `real` is (b, R, R, nc) in [-1, 1].

  Order as in PyTorch: D on real, D on detached fake, D's Adam step; then G through the
  *updated* D (still training mode). D's BatchNorm statistics thread through all three calls.
  `capture` (parity's): a third result, every layer's output in each pass (`CAPTURED_PASSES`),
  from this program itself, so that the signs parity reads are the ones this step's branches
  took (a program without those outputs may sum in another order).
  """
  # Convolution precision: "default" lets XLA use TF32 for float32 on GPUs (as PyTorch's convs
  # do by default); "highest" is true float32 (the parity mode; no effect on CPUs).
  with jax.default_matmul_precision(config.train.get("matmul_precision", "default")):
    return _train_step_with_noise(state, real, z, config=config, axis_name=axis_name,
                                  capture=capture)


# The passes of one step, in PyTorch's order: G's forward, D on the real batch, D on the
# detached fake, D after its step on the fake (G's pass)
CAPTURED_PASSES = ("G", "D(real)", "D(fake)", "D(fake) after D's step")


def _train_step_with_noise(state: GANState, real, z, *, config, axis_name: Optional[str] = None,
                           capture: bool = False):
  # BatchNorm statistics are per device (as nn.DataParallel) unless train.sync_bn asks otherwise.
  bn_axis = axis_name if config.train.get("sync_bn", False) else None
  gen, disc = models.build_models(config.model, axis_name=bn_axis, dtype=compute_dtype(config))
  # Losses and probabilities in float32 whatever the convolutions ran in.
  loss = losses.get_loss(config.train.loss)
  f32 = lambda logits: logits.astype(jnp.float32)
  sigmoid_mean = lambda logits: jax.nn.sigmoid(logits.astype(jnp.float32)).mean()

  # G forward once; its pullback is reused for G's gradient, like `fake` in PyTorch.
  def g_forward(g_params):
    out, stats, layers = _apply(gen, g_params, state.g.batch_stats, z,
                                copies=state.g.compute_params, capture=capture)
    return out, (stats, layers)

  fake, g_vjp, (g_stats, g_layers) = jax.vjp(g_forward, state.g.params, has_aux=True)
  d_copies = state.d.compute_params

  def d_loss(d_params):
    if config.train.get("d_real_fake_together", False):
      # One pass over both batches (each its own BatchNorm statistics, the running ones moved
      # real first): the same sums as two passes, in convolutions of twice the batch.
      both = jnp.concatenate([real.astype(fake.dtype), jax.lax.stop_gradient(fake)])
      logits, stats, layers = _apply(disc, d_params, state.d.batch_stats, both, groups=2,
                                     copies=d_copies, capture=capture)
      b = real.shape[0]
      logits_real, logits_fake = logits[:b], logits[b:]
      layers = (jax.tree_util.tree_map(lambda a: a[:b], layers),
                jax.tree_util.tree_map(lambda a: a[b:], layers))
    else:
      logits_real, stats, layers_real = _apply(disc, d_params, state.d.batch_stats, real,
                                               copies=d_copies, capture=capture)
      logits_fake, stats, layers_fake = _apply(disc, d_params, stats,
                                               jax.lax.stop_gradient(fake), copies=d_copies,
                                               capture=capture)
      layers = (layers_real, layers_fake)
    err_real, err_fake = loss.d_on_real(f32(logits_real)), loss.d_on_fake(f32(logits_fake))
    return err_real + err_fake, (stats, logits_real, logits_fake, layers)

  (err_d, (d_stats, logits_real, logits_fake, d_layers)), d_grads = jax.value_and_grad(
      d_loss, has_aux=True)(state.d.params)
  if axis_name is not None:
    d_grads = jax.lax.pmean(d_grads, axis_name)
  new_d = state.d.apply_gradients(grads=d_grads)

  def g_loss(fake_images):
    logits, stats, layers = _apply(disc, new_d.params, d_stats, fake_images, capture=capture)
    return loss.g_on_fake(f32(logits)), (stats, logits, layers)

  (err_g, (d_stats, logits_g, g_pass_layers)), fake_grad = jax.value_and_grad(
      g_loss, has_aux=True)(fake)
  (g_grads,) = g_vjp(fake_grad)
  if axis_name is not None:
    g_grads = jax.lax.pmean(g_grads, axis_name)
  if axis_name is not None and bn_axis is None:
    # Per-device BatchNorm statistics: average the running estimates so replicas never drift
    # (the average of the per-device updates is the update by the average batch statistic).
    g_stats, d_stats = _pmean_floats(g_stats, axis_name), _pmean_floats(d_stats, axis_name)
  new_g = state.g.apply_gradients(grads=g_grads, batch_stats=g_stats)
  new_d = new_d.replace(batch_stats=d_stats)
  if state.g.compute_params is not None:  # rounded here, the casts join Adam's kernels
    new_g = new_g.with_compute_params(compute_dtype(config))
  if state.d.compute_params is not None:
    new_d = new_d.with_compute_params(compute_dtype(config))

  metrics = {
      "Loss_D": err_d,
      "Loss_G": err_g,
      "D_x": sigmoid_mean(logits_real),
      "D_G_z1": sigmoid_mean(logits_fake),  # before D's step
      "D_G_z2": sigmoid_mean(logits_g),     # after D's step
  }
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  new_state = GANState(step=state.step + 1, g=new_g, d=new_d)
  if capture:
    return new_state, metrics, dict(zip(CAPTURED_PASSES, (g_layers, *d_layers, g_pass_layers)))
  return new_state, metrics


def _pmean_floats(tree, axis_name):
  """pmean of the float leaves (num_batches_tracked counts stay integers, equal everywhere)."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def sample_latents(rng, batch_size: int, nz: int):
  """z ~ N(0, 1), (b, nz): the seed's torch.randn(b, nz, 1, 1) without the unit dims."""
  return jax.random.normal(rng, (batch_size, nz), jnp.float32)


def train_step(state: GANState, real, rng, *, config, axis_name: Optional[str] = None):
  """`train_step_with_noise` with z drawn from `rng`."""
  z = sample_latents(rng, real.shape[0], config.model.nz)
  return train_step_with_noise(state, real, z, config=config, axis_name=axis_name)


def generate(config, g_params, g_batch_stats, z, use_running_average: bool = False):
  """G(z) without touching the training state (batch-statistics updates are discarded)."""
  gen, _ = models.build_models(config.model)
  if use_running_average:
    return gen.apply({"params": g_params, "batch_stats": g_batch_stats}, z, train=False)
  out, _, _ = _apply(gen, g_params, g_batch_stats, z)
  return out


def jit_train_step(config, with_noise: bool = False):
  """Single-device jitted step; the state is donated (updated in place)."""
  fn = train_step_with_noise if with_noise else train_step
  return jax.jit(functools.partial(fn, config=config), donate_argnums=0)
