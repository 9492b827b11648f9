"""A job's stored params become the trainer's config (worker.job_child.train_config)."""

from __future__ import annotations

from service.job_schemas import JobParams
from worker.job_child import train_config
from worker.kto.trainer import KTOTrainConfig


def test_stored_params_reach_the_trainer():
    params = JobParams(beta=0.2, microbatch_size=4, lora=True, lora_r=8, cuda_graphs=True,
                       pack_bucket=1024, lm_head_grad_cache_gib=0).model_dump()
    cfg = train_config(params, lambda_d=1.2, lambda_u=1.0, n_examples=40)
    assert (cfg.beta, cfg.microbatch_size, cfg.lambda_d, cfg.lambda_u) == (0.2, 4, 1.2, 1.0)
    assert cfg.lora is not None and (cfg.lora.r, cfg.lora.alpha) == (8, 16)
    assert cfg.cuda_graphs is True and cfg.pack_bucket == 1024 and cfg.lm_head_grad_cache_gib == 0
    assert cfg.save_every_steps == 1  # 10 steps: about 20 checkpoints a run, at least one step apart


def test_params_stored_before_the_throughput_options_still_load():
    params = JobParams().model_dump()
    del params["cuda_graphs"], params["pack_bucket"], params["lm_head_grad_cache_gib"]
    cfg = train_config(params, lambda_d=1.0, lambda_u=1.0, n_examples=800)
    assert cfg.cuda_graphs == "auto" and cfg.pack_bucket == 0  # today's defaults
    assert cfg.lm_head_grad_cache_gib == KTOTrainConfig().lm_head_grad_cache_gib > 0
    assert cfg.save_every_steps == 5  # 100 steps at microbatch 8


def test_cuda_graphs_param_is_auto_true_or_false():
    assert JobParams().cuda_graphs == "auto"
    assert JobParams(cuda_graphs=False).cuda_graphs is False
    assert train_config(JobParams(cuda_graphs=False).model_dump(), lambda_d=1.0, lambda_u=1.0,
                        n_examples=80).cuda_graphs is False
