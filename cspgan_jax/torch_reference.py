"""PyTorch reference of the CSPup-GAN, written from ../shared/SPEC.md (not the report's code).

Module structure and therefore `state_dict` keys follow the report's layout (SPEC.md, last
section), so checkpoints saved by the report's code load here with `strict=True`. Only parity,
conversion and benchmarks import this module; nothing else in the package needs torch.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import nn

from cspgan_jax.errors import ConfigError
from cspgan_jax.models import check_resolution
from cspgan_jax.ops import LEAKY_SLOPE


class CSPup(nn.Module):
  """split -> left: ConvT(x1); right: 1x1 conv, act, ConvT, 1x1 conv, act, 1x1 conv; sum."""

  def __init__(self, in_channels, out_channels, kernel_size=4, stride=2, padding=1,
               block="relu", bn_momentum=0.1, bn_eps=1e-5):
    super().__init__()
    self.split = in_channels // 2
    rest = in_channels - self.split  # x2 keeps the odd channel (the report's code would crash)
    c = out_channels
    convt = lambda cin: nn.ConvTranspose2d(cin, c, kernel_size, stride, padding, bias=False)
    self.left = nn.Sequential(convt(self.split))
    if block == "relu":
      self.right = nn.Sequential(
          nn.Conv2d(rest, c, 1), nn.ReLU(), convt(c), nn.Conv2d(c, c, 1), nn.ReLU(),
          nn.Conv2d(c, c, 1))
    elif block == "leaky_bn":
      bn = lambda: nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)
      self.right = nn.Sequential(
          nn.Conv2d(rest, c, 1), bn(), nn.LeakyReLU(LEAKY_SLOPE), convt(c), nn.Conv2d(c, c, 1),
          bn(), nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(c, c, 1))
    else:
      raise ConfigError(f"model.block={block!r} has no PyTorch twin: add its branch to "
                        "torch_reference.CSPup")

  def forward(self, x):
    return self.left(x[:, :self.split]) + self.right(x[:, self.split:])


class Generator(nn.Module):
  def __init__(self, nz=100, ngf=64, nc=3, resolution=128, block="relu", bn_momentum=0.1,
               bn_eps=1e-5):
    super().__init__()
    n_blocks = check_resolution(resolution)
    layers, cin = [], nz
    for i in range(n_blocks):
      c = ngf * 2 ** (n_blocks - 1 - i)
      stride, pad = (1, 0) if i == 0 else (2, 1)
      layers.append(CSPup(cin, c, 4, stride, pad, block, bn_momentum, bn_eps))
      cin = c
    layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
    self.main = nn.Sequential(*layers)

  def forward(self, z):
    return self.main(z)


class Discriminator(nn.Module):
  """Ends in Sigmoid, as the report's; `kind` is "dcgan" or "avgpool"."""

  def __init__(self, ndf=64, nc=3, resolution=128, kind="dcgan", bn_momentum=0.1, bn_eps=1e-5):
    super().__init__()
    n_down = check_resolution(resolution)
    conv = lambda cin, cout: nn.Conv2d(cin, cout, 4, 2, 1, bias=False)
    bn = lambda ch: nn.BatchNorm2d(ch, eps=bn_eps, momentum=bn_momentum)
    lrelu = lambda: nn.LeakyReLU(LEAKY_SLOPE)  # not in place: parity hooks read BN outputs
    if kind == "dcgan":
      layers, c, n_stages = [conv(nc, ndf), lrelu()], ndf, n_down - 1
    elif kind == "avgpool":
      layers = [conv(nc, 2 * ndf), bn(2 * ndf), lrelu(), nn.AvgPool2d(4, 2, 1)]
      c, n_stages = 2 * ndf, n_down - 2
    else:
      raise ConfigError(f"model.discriminator={kind!r} has no PyTorch twin: add its branch to "
                        "torch_reference.Discriminator")
    for _ in range(n_stages):
      layers += [conv(c, 2 * c), bn(2 * c), lrelu()]
      c *= 2
    layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
    self.main = nn.Sequential(*layers)

  def forward(self, x):
    return self.main(x)

  def logits(self, x):
    """The output before the Sigmoid (what the JAX Discriminator returns)."""
    return self.main[:-1](x)


def weights_init(m):
  """DCGAN init: 'Conv' in the class name (ConvTranspose2d too) -> N(0, 0.02); BN -> N(1, 0.02), 0."""
  name = m.__class__.__name__
  if "Conv" in name:
    nn.init.normal_(m.weight.data, 0.0, 0.02)
  elif "BatchNorm" in name:
    nn.init.normal_(m.weight.data, 1.0, 0.02)
    nn.init.constant_(m.bias.data, 0)


def build_reference(model_config, seed=None):
  """(netG, netD) from `config.model`, DCGAN-initialised (seeded if `seed` is given)."""
  mc = model_config
  if seed is not None:
    torch.manual_seed(seed)
  net_g = Generator(mc.nz, mc.ngf, mc.nc, mc.resolution, mc.block, mc.bn_momentum, mc.bn_epsilon)
  net_d = Discriminator(mc.ndf, mc.nc, mc.resolution, mc.discriminator, mc.bn_momentum,
                        mc.bn_epsilon)
  net_g.apply(weights_init)
  net_d.apply(weights_init)
  return net_g, net_d


def make_optimizers(net_g, net_d, train_config):
  t = train_config
  betas = (t.beta1, t.beta2)
  opt_g = torch.optim.Adam(net_g.parameters(), lr=t.lr_g, betas=betas, eps=t.adam_eps)
  opt_d = torch.optim.Adam(net_d.parameters(), lr=t.lr_d, betas=betas, eps=t.adam_eps)
  return opt_g, opt_d


class GANLoss(NamedTuple):
  """`losses.GANLoss`'s twin: the same three losses, of D's outputs (N,)."""
  d_on_real: Callable
  d_on_fake: Callable
  g_on_fake: Callable
  on_logits: bool  # of D's output before its Sigmoid (else of its probabilities, the seed's)


def _bce_game(criterion, on_logits: bool) -> GANLoss:
  """The seed's game: D tells real (1) from fake (0); G wants 1 (`losses.bce_game`)."""
  with_target = lambda y: lambda out: criterion(out, torch.full_like(out, y))
  return GANLoss(with_target(1.0), with_target(0.0), with_target(1.0), on_logits)


# One entry per `losses.LOSSES` entry, by the same name: `cspgan parity` needs the twin.
LOSSES = {
    "torch_bce": _bce_game(nn.BCELoss(), on_logits=False),  # the seed's, on D's Sigmoid
    "bce_logits": _bce_game(nn.BCEWithLogitsLoss(), on_logits=True),
}


def get_loss(name: str) -> GANLoss:
  if name not in LOSSES:
    raise ConfigError(f"train.loss={name!r} has no PyTorch twin: add it to "
                      "torch_reference.LOSSES (the twin of losses.LOSSES)")
  return LOSSES[name]


def _d_outputs(net_d, loss: GANLoss):
  """(the D output the loss takes, its probabilities from that output)."""
  if loss.on_logits:
    return net_d.logits, torch.sigmoid
  return net_d, lambda p: p


def train_iteration(net_g, net_d, opt_g, opt_d, real, noise, autocast: bool = False,
                    loss: str = "torch_bce"):
  """The seed's iteration (SPEC.md, "Training step"); real (b, nc, R, R), noise (b, nz, 1, 1).

  `autocast`: the networks under bf16 autocast on real's device, as a PyTorch user runs mixed
  precision; BCELoss is not autocast-safe, so D's outputs go to the loss in real's dtype.
  `loss`: a `LOSSES` name (`config.train.loss`); D_x and D_G_z are mean probabilities."""
  game = get_loss(loss)
  d_forward, prob = _d_outputs(net_d, game)
  amp = lambda: torch.autocast(real.device.type, torch.bfloat16, enabled=autocast)

  def net_d_out(x):
    with amp():
      out = d_forward(x)
    return out.to(real.dtype).view(-1)

  net_g.train()
  net_d.train()
  net_d.zero_grad()
  output = net_d_out(real)
  err_d_real = game.d_on_real(output)
  err_d_real.backward()
  d_x = prob(output).mean().item()
  with amp():
    fake = net_g(noise)
  output = net_d_out(fake.detach())
  err_d_fake = game.d_on_fake(output)
  err_d_fake.backward()
  d_g_z1 = prob(output).mean().item()
  err_d = err_d_real + err_d_fake
  opt_d.step()

  net_g.zero_grad()
  output = net_d_out(fake)
  err_g = game.g_on_fake(output)
  err_g.backward()
  d_g_z2 = prob(output).mean().item()
  opt_g.step()
  return {"Loss_D": err_d.item(), "Loss_G": err_g.item(), "D_x": d_x, "D_G_z1": d_g_z1,
          "D_G_z2": d_g_z2}


ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)  # the branch sites: x > 0 picks the branch, both ways


class _GivenBranch(torch.autograd.Function):
  """An activation whose branch is given (`positive`), not read from x's sign: x there, else
  slope * x; the derivative likewise."""

  @staticmethod
  def forward(ctx, x, positive, slope):  # pylint: disable=arguments-differ
    ctx.slope = slope
    ctx.save_for_backward(positive)
    return torch.where(positive, x, x * slope)

  @staticmethod
  def backward(ctx, grad):  # pylint: disable=arguments-differ
    (positive,) = ctx.saved_tensors
    return torch.where(positive, grad, grad * ctx.slope), None, None


@contextlib.contextmanager
def branch_sites(nets: Dict[str, nn.Module], force: Optional[dict] = None):
  """Records the input of every ReLU/LeakyReLU in `nets` ({tag: module}) while the block runs:
  yields {(tag, module path): [input of each call, in call order]}. The inputs are kept, not
  copied (no activation here works in place).

  `force`: {(tag, module path, call): (flat indices into that input, branch at each: bool)};
  there the activation takes the given branch, value and derivative, whatever x's sign (parity's
  branch-aligned float64 run). Without `force` every activation computes exactly as before."""
  force = force or {}
  record = {}
  patched = []
  for tag, net in nets.items():
    for path, module in net.named_modules():
      if not isinstance(module, ACTIVATIONS):
        continue
      calls = record.setdefault((tag, path), [])
      slope = module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0

      def forward(x, module=module, calls=calls, key=(tag, path), slope=slope):
        given = force.get((*key, len(calls)))
        calls.append(x.detach())
        if given is None:
          return type(module).forward(module, x)
        index, positive = given
        branch = (x > 0).reshape(-1).clone()
        branch[torch.as_tensor(index)] = torch.as_tensor(positive)
        return _GivenBranch.apply(x, branch.reshape(x.shape), slope)

      module.forward = forward  # an instance attribute: `del` restores the class's
      patched.append(module)
  try:
    yield record
  finally:
    for module in patched:
      del module.forward


def train_iteration_per_chunk(net_g, net_d, opt_g, opt_d, real, noise, chunks: int,
                              loss: str = "torch_bce"):
  """The seed's iteration as `nn.DataParallel` over `chunks` devices runs it, written out.

  Each chunk has its own BatchNorm batch statistics (as each replica does); the gradient is the
  average of the chunks' gradients (the mean loss over the whole batch, equal chunks); running
  statistics are averaged over chunks afterwards (the JAX trainer's rule, so replicas never
  drift; DataParallel itself keeps device 0's). The reference for per-device BatchNorm.
  """
  game = get_loss(loss)
  reals, noises = real.chunk(chunks), noise.chunk(chunks)
  g_reps = [copy.deepcopy(net_g).train() for _ in range(chunks)]
  d_reps = [copy.deepcopy(net_d).train() for _ in range(chunks)]
  fakes, m = [], {"Loss_D": 0.0, "Loss_G": 0.0, "D_x": 0.0, "D_G_z1": 0.0, "D_G_z2": 0.0}
  for g, d, x, z in zip(g_reps, d_reps, reals, noises):
    d_forward, prob = _d_outputs(d, game)
    d.zero_grad()
    out = d_forward(x).view(-1)
    err_real = game.d_on_real(out)
    err_real.backward()
    m["D_x"] += prob(out).mean().item() / chunks
    fake = g(z)
    fakes.append(fake)
    out = d_forward(fake.detach()).view(-1)
    err_fake = game.d_on_fake(out)
    err_fake.backward()
    m["D_G_z1"] += prob(out).mean().item() / chunks
    m["Loss_D"] += (err_real + err_fake).item() / chunks
  _average_into(net_d, d_reps, grads=True)
  opt_d.step()
  d_news = [copy.deepcopy(net_d).train() for _ in range(chunks)]
  for g, d, fake in zip(g_reps, d_news, fakes):
    d_forward, prob = _d_outputs(d, game)
    g.zero_grad()
    out = d_forward(fake).view(-1)
    err_g = game.g_on_fake(out)
    err_g.backward()
    m["D_G_z2"] += prob(out).mean().item() / chunks
    m["Loss_G"] += err_g.item() / chunks
  _average_into(net_g, g_reps, grads=True)
  opt_g.step()
  _average_into(net_d, d_news, grads=False)
  return m


def _average_into(net, replicas, grads: bool):
  """net's float buffers (and gradients) := the replicas' average."""
  with torch.no_grad():
    if grads:
      for p, *reps in zip(net.parameters(), *[r.parameters() for r in replicas]):
        p.grad = torch.stack([r.grad for r in reps]).mean(0)
    for (name, b), *reps in zip(net.named_buffers(), *[r.buffers() for r in replicas]):
      if b.is_floating_point():
        b.copy_(torch.stack(list(reps)).mean(0))
      else:
        b.copy_(reps[0])
