"""EleutherAI's lm-eval harness scores through the server with `model="auto"`: a generative task
(generate_until, exact match) and a multiple-choice task (loglikelihoods from `echo` +
`logprobs`), both from a small local task file written here (no dataset download), sent in
batches of prompts (`batch_size=4`). Its numbers,
and every response it got, equal the library's own scoring of the same items."""

from __future__ import annotations

import json

import pytest

from loraswitch.server.protocol import CompletionRequest
from loraswitch.switch.request import Done, Request

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = ["What is the river called?", "Name a colour.", "Count to three.", "Say hello."]
MC = [("The sky is", ["blue", "green", "loud"]), ("Two plus two is", ["four", "five", "six"]),
      ("Rivers flow to the", ["sea", "moon", "cupboard"]), ("Cats like to", ["sleep", "fly", "sing"])]


def _answers(switch, requests):
    out = [None] * len(requests)
    for i, event in switch.stream(requests):
        if isinstance(event, Done):
            out[i] = event.answer
    return out


def _loglikelihoods(switch, tok, context: str, choices: list[str]) -> list[float]:
    """The library's own scoring: each choice's tokens' logprobs after the context (echo)."""
    ctx = tok(context)["input_ids"]
    rows = [tok(context + " " + c)["input_ids"] for c in choices]  # lm-eval's encoding of the pair
    answers = _answers(switch, [Request(prompt=tuple(r), model="auto", max_tokens=1, echo=True, logprobs=0) for r in rows])
    return [sum(lp.logprob for lp in a.prompt_logprobs[len(ctx):]) for a in answers]


def _task_files(root, switch, tok):
    gen = _answers(switch, [Request(prompt=q, model="auto", max_tokens=8, stop=("\n", tok.eos_token)) for q in QUESTIONS])
    # half the targets are what the model says, half are not: exact match is 50% only if both agree
    gen_docs = [{"question": q, "answer": a.text if i % 2 == 0 else "no such answer"}
                for i, (q, a) in enumerate(zip(QUESTIONS, gen))]
    scores = [_loglikelihoods(switch, tok, q, c) for q, c in MC]
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    mc_docs = [{"question": q, "choices": c, "label": b if i % 2 == 0 else (b + 1) % len(c)}
               for i, ((q, c), b) in enumerate(zip(MC, best))]
    for name, docs in (("gen", gen_docs), ("mc", mc_docs)):
        (root / f"{name}.json").write_text("\n".join(json.dumps(d) for d in docs))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
    (root / "ls_gen.yaml").write_text(
        f"task: ls_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.json'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (root / "ls_mc.yaml").write_text(
        f"task: ls_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.json'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n")
    return gen, scores, best, gen_docs


def test_lm_eval_scores_through_the_server_like_the_library(live, lib, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    switch, _ = lib
    tok = switch.base.tokenizer
    monkeypatch.setenv("OPENAI_API_KEY", live.app.state.settings.api_key)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok_dir = tmp_path / "tokenizer"
    tok.save_pretrained(tok_dir)
    gen, scores, best, gen_docs = _task_files(tmp_path, switch, tok)
    batches = []  # how many prompts each completions body held (batch_size=4 sends lists of them)
    prompts = CompletionRequest.prompt_inputs
    monkeypatch.setattr(CompletionRequest, "prompt_inputs", lambda body: batches.append(len(prompts(body))) or prompts(body))

    out = simple_evaluate(
        model="local-completions",
        model_args=f"model=auto,base_url={live.url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={tok_dir},num_concurrent=1,max_retries=1,max_length=200,batch_size=4",
        tasks=["ls_gen", "ls_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )
    res = out["results"]
    assert max(batches) > 1
    assert res["ls_mc"]["acc,none"] == pytest.approx(0.5)  # the library's argmax is right on items 0 and 2
    assert res["ls_gen"]["exact_match,none"] == pytest.approx(0.5)
    for sample in out["samples"]["ls_mc"]:
        i = sample["doc_id"]
        got = [r[0] for r in sample["filtered_resps"]]
        assert got == pytest.approx(scores[i], abs=1e-4)  # every loglikelihood equals the library's
        assert max(range(len(got)), key=got.__getitem__) == best[i]
    for sample in out["samples"]["ls_gen"]:
        i = sample["doc_id"]
        assert sample["filtered_resps"][0] == gen[i].text  # every generation equals the library's
