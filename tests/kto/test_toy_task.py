"""On the toy task, a short KTO run from an imperfect base raises greedy task accuracy above
π_ref's, on imbalanced thumbs (1 desirable : 4 undesirable) with λ from the balancer. The same
run with λD = λU is reported beside it."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.balance import compute_weights
from worker.kto import toy
from worker.kto.evaluate import evaluate_policy
from worker.kto.trainer import KTOTrainConfig, train_kto


def test_kto_raises_task_accuracy_with_balanced_weights(base_dir, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(base_dir)
    ref = AutoModelForCausalLM.from_pretrained(base_dir)
    acc_ref = toy.task_accuracy(ref, tok)

    rows = toy.make_feedback(200, desirable_fraction=0.2, seed=1)
    nd = sum(r["label"] for r in rows)
    bal = compute_weights(nd, len(rows) - nd)
    assert bal.allowed and bal.lambda_d > 3 and bal.lambda_u == 1.0

    results = {}
    for name, (ld, lu) in {"balanced": (bal.lambda_d, bal.lambda_u), "equal": (1.0, 1.0)}.items():
        cfg = KTOTrainConfig(beta=0.1, lambda_d=ld, lambda_u=lu, learning_rate=3e-4, microbatch_size=8,
                             num_epochs=2, warmup_ratio=0.1, max_length=32, seed=0)
        res = train_kto(cfg, base_dir, rows, tmp_path / name)
        results[name] = (toy.task_accuracy(res.model, tok), res.history[-1], res.model)

    held_out = toy.make_feedback(60, desirable_fraction=0.5, seed=99)
    report = evaluate_policy(results["balanced"][2], ref, tok, held_out, beta=0.1, n_generate=40, max_new_tokens=4,
                             task_evaluator="worker.kto.toy:arithmetic_accuracy")
    with capsys.disabled():
        print(f"\n[toy task] nD={nd} nU={len(rows) - nd} balanced λD={bal.lambda_d:.2f} λU={bal.lambda_u:.2f}")
        print(f"[toy task] greedy accuracy: π_ref {acc_ref:.2f} | KTO balanced {results['balanced'][0]:.2f} "
              f"| KTO λD=λU {results['equal'][0]:.2f}")
        print(f"[toy task] held-out eval (balanced): {report.as_dict()}")

    acc_bal = results["balanced"][0]
    assert acc_bal >= acc_ref + 0.2, (acc_ref, acc_bal)
    assert acc_bal > results["equal"][0]  # robust on this setup: the λD = λU run lags (0.19 vs 0.81 measured)
    assert report.margin is not None and report.margin > 0
    assert report.task_policy > report.task_reference
    assert report.gen_len_policy is not None and report.gen_len_reference is not None


def test_sampled_kl_draws_from_the_policy_itself_not_its_generation_config():
    """kl_sampled is E_{y~πθ}[log πθ(y|x) − log πref(y|x)]: its samples must come from πθ, not from
    the distribution a shipped generation_config (temperature, top-k/top-p, repetition penalty) or
    transformers' default top_k=50 makes of it. Here the policy's config says top_k=1, which turns
    "sampling" into greedy decoding: an unrestricted sample of the untrained toy differs from it."""
    from worker.kto.evaluate import generate

    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=1)
    model.generation_config.update(top_k=1, top_p=0.5, temperature=0.3, min_p=0.5, typical_p=0.5,
                                   repetition_penalty=2.0)
    prompts = toy.arithmetic_prompts()[:32]
    greedy = generate(model, tok, prompts, max_new_tokens=4)
    sampled = generate(model, tok, prompts, max_new_tokens=4, do_sample=True, seed=0)
    assert sum(g == s for g, s in zip(greedy, sampled)) < len(prompts) // 2
    model.generation_config.update(no_repeat_ngram_size=1)  # would forbid any token seen before
    _, rows = generate(model, tok, prompts, max_new_tokens=12, do_sample=True, seed=0, return_ids=True)
    assert any(len(set(r)) < len(r) for r in rows)  # πθ itself repeats tokens


def test_generation_ignores_every_distribution_option_of_the_models_generation_config():
    """transformers fills whatever a generate() call leaves unset from the model's generation_config:
    suppressed, forced or banned tokens and a minimum length would each bias kl_sampled (y ~ πθ) and the
    length drift. With the same seed, the draws (and greedy decoding) are the same whatever that config
    says, and the config is left as it was."""
    from collections import Counter

    from worker.kto.evaluate import generate

    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=1)
    prompts = toy.arithmetic_prompts()[:32]
    sampled = generate(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=0, return_ids=True)[1]
    greedy = generate(model, tok, prompts, max_new_tokens=8, return_ids=True)[1]
    common = [t for t, _ in Counter(t for r in sampled + greedy for t in r).most_common(3)]
    model.generation_config.update(suppress_tokens=[common[0]], begin_suppress_tokens=[common[1]],
                                   bad_words_ids=[[common[2]]], min_new_tokens=8,
                                   forced_eos_token_id=tok.eos_token_id, forced_bos_token_id=common[1])
    assert generate(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=0, return_ids=True)[1] == sampled
    assert generate(model, tok, prompts, max_new_tokens=8, return_ids=True)[1] == greedy
    assert model.generation_config.suppress_tokens == [common[0]]
    assert model.generation_config.min_new_tokens == 8


def test_held_out_mismatched_kl_truncates_pairs_as_training_does():
    """kl_mismatched is the z0 estimate KTO itself uses: its pairs (x_i, y_j) are cut at max_length as the
    trainer's KL sequences are (worker.kto.data.collate_microbatch), not scored past it."""
    import torch

    from worker.kto.data import FeedbackExample, collate_microbatch, make_plan, tokenize_examples
    from worker.kto.logprobs import sequence_logps

    tok = toy.make_tokenizer()
    policy, ref = toy.make_model(tok, seed=1), toy.make_model(tok, seed=2)
    rows = [FeedbackExample("1+2=" * 5, "3", True), FeedbackExample("4+4=", "8 is the sum of four and four", False),
            FeedbackExample("9+9=" * 4, "18", True), FeedbackExample("2+5=", "7 because two and five make it", False)]
    ml, bs = 24, 4
    rep = evaluate_policy(policy, ref, tok, rows, max_length=ml, batch_size=bs, n_generate=0)
    data, _ = tokenize_examples(rows, tok, max_length=ml)
    plan = make_plan(len(data), bs, seed=0)
    b = collate_microbatch(data, range(len(data)), plan, tok.pad_token_id, ml)
    assert b["kl_input_ids"].shape[1] == ml  # some pair is cut
    with torch.no_grad():
        want = [sequence_logps(m, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"]) for m in (policy, ref)]
    assert rep.kl_mismatched == pytest.approx(float((want[0] - want[1]).mean()), rel=1e-5, abs=1e-6)


def test_held_out_examples_are_cut_at_the_jobs_max_prompt_length():
    """The gate scores held-out events as the job trained: with its max_prompt_length, not the
    max_length // 2 default."""
    import torch

    from worker.kto.data import FeedbackExample, collate_microbatch, make_plan, tokenize_examples
    from worker.kto.logprobs import sequence_logps

    tok = toy.make_tokenizer()
    policy, ref = toy.make_model(tok, seed=1), toy.make_model(tok, seed=2)
    rows = [FeedbackExample("1+2=" * 12, "3 is the answer", True), FeedbackExample("4+4=" * 12, "8", False),
            FeedbackExample("9+9=" * 12, "18 it is", True), FeedbackExample("2+5=" * 12, "7", False)]
    ml, mpl, bs = 40, 6, 4
    rep = evaluate_policy(policy, ref, tok, rows, max_length=ml, max_prompt_length=mpl, batch_size=bs,
                          n_generate=0)
    data, _ = tokenize_examples(rows, tok, max_length=ml, max_prompt_length=mpl)
    assert all(len(e.prompt_ids) == mpl for e in data)  # every prompt was cut to it
    b = collate_microbatch(data, range(len(data)), make_plan(len(data), bs, seed=0), tok.pad_token_id, ml)
    with torch.no_grad():
        p, r = (sequence_logps(m, b["input_ids"], b["attention_mask"], b["completion_mask"]) for m in (policy, ref))
    rewards = 0.1 * (p - r)
    want = float(rewards[0::2].mean() - rewards[1::2].mean())
    assert rep.margin == pytest.approx(want, rel=1e-5, abs=1e-6)
    default = evaluate_policy(policy, ref, tok, rows, max_length=ml, batch_size=bs, n_generate=0)
    assert default.margin != pytest.approx(want, rel=1e-3)  # the limit changes what is scored
