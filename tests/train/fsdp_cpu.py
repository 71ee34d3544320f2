"""Run ``train_qwen`` with accelerate's FSDP2 path on CPU processes (gloo), for the tests.

    torchrun --nproc_per_node 2 -m tests.train.fsdp_cpu --fsdp "full_shard auto_wrap" \\
        --fsdp_config scripts/fsdp2.json --use_cpu True ...

accelerate turns FSDP on only on accelerators (``AcceleratorState`` picks ``MULTI_CPU``
with gloo and drops the FSDP plugin), and the product refuses ``--fsdp`` there
(``QwenVLTrainer._fsdp_unavailable``).  PyTorch's ``fully_shard`` itself runs on CPU
with gloo, so this test-only trainer sets accelerate's state to FSDP with the plugin the
Trainer built; everything after that is the real path: accelerate's ``fsdp2_prepare_model``
(``fully_shard`` per decoder layer / vision block, tail and root groups), the Trainer's
FSDP checkpointing and resuming, our loss, save and exit code.  With ``"hsdp_replicas"`` in the
config it also gives accelerate the HSDP parallelism config and its 2-D device mesh, as
``Accelerator`` does at its start on GPUs.
"""
from __future__ import annotations

import sys

from qwenvl.train.trainer import QwenVLTrainer


class CpuFsdpTrainer(QwenVLTrainer):
    def _fsdp_unavailable(self):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        from qwenvl.train.sharding import hsdp_parallelism_config

        state = self.accelerator.state
        from torch.distributed.fsdp import CPUOffloadPolicy

        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if isinstance(state.fsdp_plugin.cpu_offload, CPUOffloadPolicy):
            # "cpu_offload": true. The policy pins the host copies for fast copies to the GPU, and
            # pinning needs a CUDA driver; on CPU processes the same offload path runs unpinned.
            state.fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True
        # HSDP: what accelerate does with the Trainer's parallelism_config at its start (which the
        # product passes on GPUs only), done here once the state says FSDP.
        config = hsdp_parallelism_config(self.args)
        if config is not None:
            self.args.parallelism_config = config
            state.parallelism_config = config
            state.device_mesh = config.get_device_mesh("cpu")
            config._validate_accelerator(self.accelerator)


if __name__ == "__main__":
    from qwenvl.train.train_qwen import train

    train(sys.argv[1:], trainer_class=CpuFsdpTrainer)
