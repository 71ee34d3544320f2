"""Run ``train_qwen`` with accelerate's FSDP2 path on CPU processes (gloo), for the tests.

    torchrun --nproc_per_node 2 -m tests.train.fsdp_cpu --fsdp "full_shard auto_wrap" \\
        --fsdp_config scripts/fsdp2.json --use_cpu True ...

accelerate turns FSDP on only on accelerators (``AcceleratorState`` picks ``MULTI_CPU``
with gloo and drops the FSDP plugin), and the product refuses ``--fsdp`` there
(``QwenVLTrainer._fsdp_unavailable``).  PyTorch's ``fully_shard`` itself runs on CPU
with gloo, so this test-only trainer sets accelerate's state to FSDP with the plugin the
Trainer built; everything after that is the real path: accelerate's ``fsdp2_prepare_model``
(``fully_shard`` per decoder layer / vision block, tail and root groups), the Trainer's
FSDP checkpointing and resuming, our loss, save and exit code.
"""
from __future__ import annotations

import sys

from qwenvl.train.trainer import QwenVLTrainer


class CpuFsdpTrainer(QwenVLTrainer):
    def _fsdp_unavailable(self):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True


if __name__ == "__main__":
    from qwenvl.train.train_qwen import train

    train(sys.argv[1:], trainer_class=CpuFsdpTrainer)
