# NCCL and XLA settings for multi-GPU training, in one place. Sourced by
# slurm_gpu.sbatch and local.sh; a value already set in the environment wins.
# (tests/test_launch.py checks that the installed jaxlib accepts every XLA flag.)

# Overlap collectives with compute: the latency-hiding scheduler, pipelined
# FSDP all-gathers / reduce-scatters, and large combine thresholds so that many
# small per-layer collectives become few large ones.
BERT_JAX_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true
 --xla_gpu_enable_highest_priority_async_stream=true
 --xla_gpu_enable_pipelined_all_gather=true
 --xla_gpu_enable_pipelined_reduce_scatter=true
 --xla_gpu_enable_pipelined_all_reduce=true
 --xla_gpu_enable_while_loop_double_buffering=true
 --xla_gpu_all_reduce_combine_threshold_bytes=134217728
 --xla_gpu_all_gather_combine_threshold_bytes=134217728
 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
BERT_JAX_GPU_XLA_FLAGS=$(echo $BERT_JAX_GPU_XLA_FLAGS)  # one line
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$BERT_JAX_GPU_XLA_FLAGS"

# Let XLA take most of each GPU up front (the rest for NCCL and cuDNN workspaces).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# One hardware queue per device keeps compute and communication kernels ordered
# as the scheduler planned them (NVIDIA's JAX guidance for overlap).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Cluster-specific, set them in your environment if needed:
#   NCCL_SOCKET_IFNAME (bootstrap interface), NCCL_IB_HCA (InfiniBand adapters),
#   NCCL_NET_GDR_LEVEL (GPUDirect RDMA), NCCL_CROSS_NIC.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
