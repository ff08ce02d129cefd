"""Baseline: the seed report's first run (SPEC.md, "The experiments").

CSPup generator (ReLU, no BatchNorm) against the DCGAN discriminator, CelebA at 128x128,
lr_g 1e-4, lr_d 5e-5, Adam(0.5, 0.999), batch 64, 10 epochs, BCE on sigmoid probabilities
with PyTorch's clamping. The report never got it to converge.

Numerics check against PyTorch (2-core CPU, a few minutes):
  cspgan parity --config configs/baseline.py --steps 3

Train (CelebA prepared once, README "Data"): cspgan train --config configs/baseline.py --workdir runs/baseline
On one H200 (2026-11-27): 7,769 images/s, 10 epochs in 4.3 min of iterations; with
--config.train.dtype=bfloat16 11,894 images/s, 2.8 min (docs/PERFORMANCE.md; CPU: about 10 s a
step).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.block = "relu"            # CSPup variant: "relu" (original) or "leaky_bn" (exp2)
  config.model.discriminator = "dcgan"   # "dcgan" (original) or "avgpool" (exp1)
  config.model.nz = 100                  # latent size
  config.model.ngf = 64                  # G's width (channels of its last block)
  config.model.ndf = 64                  # D's width (its first layer's channels; avgpool: twice)
  config.model.nc = 3                    # image channels
  config.model.resolution = 128          # image side: a power of two >= 32
  config.model.bn_momentum = 0.1         # PyTorch convention: weight of the new batch statistic
  config.model.bn_epsilon = 1e-5
  # True: each network's first and last layers (3 channels in or out, or a 4x4 window over a
  # 4x4 or 1x1 input: shapes cuDNN runs slowly) as one matmul between im2col / col2im
  # rearrangements (`conv_matmul`): the same products, summed in another order.
  config.model.edge_layers_as_matmul = False

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64            # global: split evenly over all devices
  config.train.epochs = 10               # an epoch: len(dataset) // batch_size steps
  config.train.num_steps = 0             # > 0: train this many steps instead of `epochs`
  config.train.lr_g = 1e-4
  config.train.lr_d = 5e-5
  config.train.beta1 = 0.5               # not printed in the report; the DCGAN value it inherits
  config.train.beta2 = 0.999
  config.train.adam_eps = 1e-8           # PyTorch Adam's default
  # "torch_adam": torch.optim.Adam's float32 rounding, op for op (parity); "adam": optax.adam.
  config.train.optimizer = "torch_adam"
  config.train.seed = 0                  # initial weights, training noise, fixed latents
  config.train.loss = "torch_bce"        # the seed's (clamped BCELoss); any losses.LOSSES key
  config.train.dtype = "float32"         # "bfloat16": convolutions in bf16 (params, Adam, BN stats, losses f32)
  # "default": XLA may use TF32 for float32 convolutions on GPUs (PyTorch's convs do by default);
  # "highest": true float32 (what `cspgan parity` uses).
  config.train.matmul_precision = "default"
  config.train.steps_per_dispatch = 1    # > 1: a lax.scan of that many steps per launch
  config.train.scan_unroll = 1           # lax.scan's unroll for steps_per_dispatch > 1
  # True: D's passes over the real and the fake batch as one batch of twice the size (each half
  # its own BatchNorm statistics): the same arithmetic, fewer and larger convolutions.
  config.train.d_real_fake_together = False
  config.train.sync_bn = False           # multi-device: BatchNorm statistics per device, as DataParallel
  # The report samples the fixed-noise grid with G in training mode (batch statistics).
  config.train.sample_use_running_average = False
  config.train.num_samples = 64          # fixed latents of the sample grid
  config.train.log_every = 1000          # the seed's cadence: scalars and a console line
  config.train.sample_every = 500        # the seed's cadence: G(fixed_noise) grid
  config.train.checkpoint_every = 5000   # also at the end and on SIGTERM / SIGINT
  config.train.keep_checkpoints = 3      # the latest this many are kept
  config.train.stop_check_every = 100    # multi-host: steps between SIGTERM checks (a collective)
  # > 0: a device trace of that many steps from step `profile_start` (past compilation and
  # warm-up) into tensorboard/plugins/profile, with the step's HLO beside it (process 0)
  config.train.profile_steps = 0
  config.train.profile_start = 20
  # XLA compiler options for the training step, "name=value,..." by XLA's DebugOptions names,
  # e.g. "xla_gpu_enable_pdl=true" (Hopper: each kernel may start while the one before drains)
  config.train.xla_options = ""

  # Multi-host: empty = one process, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  # JAX_PROCESS_ID from the environment.
  config.dist = ml_collections.ConfigDict()
  # "slurm" / "openmpi": what the three below leave unset comes from the srun step's SLURM_*
  # variables / Open MPI 4 mpirun's OMPI_* ones
  config.dist.cluster = ""
  config.dist.coordinator_address = ""
  config.dist.num_processes = 0
  config.dist.process_id = -1
  # Seconds the processes wait for one another at start-up before each ends with one line
  # saying what it found (jax's default wait)
  config.dist.initialization_timeout = 300

  config.data = ml_collections.ConfigDict()
  # "tfds": a dataset written by `cspgan prepare-data` (or a TFDS catalogue name such as the
  # official "celeb_a", which needs TensorFlow); "synthetic": cartoon faces drawn in memory.
  config.data.source = "tfds"
  config.data.name = "celeba"
  config.data.data_dir = ""              # "" = TFDS's default, ~/tensorflow_datasets
  # "all": every image, as the seed's ImageFolder read them (CelebA: 202,599). Where
  # prepare-data found CelebA's list_eval_partition.txt, "train" is the official 162,770;
  # TFDS's split syntax works ("train+validation", "train[:10%]").
  config.data.split = "all"
  config.data.num_examples = 0           # tfds: use the first N (0 = all); synthetic: size (0 = 10,000)
  config.data.synthetic_seed = 0         # synthetic: which faces are drawn
  config.data.shuffle_seed = 0           # the per-epoch order is permutation(seed, epoch, shard)
  # "device": the uint8 dataset lives on the accelerator and the step gathers its batch;
  # "streaming": a host thread feeds batches; "auto": device if it fits device_budget_gb.
  config.data.pipeline = "auto"
  config.data.device_budget_gb = 0.0     # 0 = 40% of the device's memory (25% of RAM on a CPU)
  config.data.prefetch = 2               # streaming: batches put on the devices ahead of the step
  config.data.reader_threads = 4         # streaming: threads reading and placing batches
  return config
