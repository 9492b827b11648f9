"""The loop over several rounds (ARCHITECTURE.md, "The loop must not make things worse").

Round after round: users vote on what the serving call gave them, a KTO job trains on the
new votes against the current production as π_ref, the gate scores the result on held-out
votes, a candidate goes to a canary, and the guard compares live thumbs-up rates and promotes
or rolls back. Two rounds are poisoned by a frontend bug that flips the thumbs: the KTO run
then comes out worse at the task while its held-out margin looks fine. Production's task
accuracy must never fall (beyond the guard's non-inferiority margin), whichever safeguard
catches the bad model.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from service import live, registry


def _run_canary(lab, rng, batch: int = 500, max_requests: int = 30_000) -> str:
    """Live traffic in batches, the guard ticking after each (as beat does)."""
    for _ in range(max_requests // batch):
        lab.traffic(batch, rng)
        for action in live.guard_tick(lab.engine, lab.settings):
            if action.action in ("promoted", "rolled_back"):
                lab.settle_snapshots()
                return action.action
    return "undecided"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _production(lab) -> tuple[str, str, float]:
    served = lab.serving()  # anonymous: always production
    return served["model_version"], served["model_path"], lab.accuracy(served["model_path"])


def test_several_rounds_never_make_production_worse(make_lab):
    lab = make_lab(auto_canary_percent=50.0)
    rng = random.Random(0)
    # a deployment whose gate has no task evaluator and a loose KL bound
    loose_gate = lab.settings.model_copy(update={"gate_task_evaluator": None,
                                                 "gate_max_kl": 50.0})
    history = [_production(lab)]
    assert history[0][0] == "default-base" and history[0][2] < 0.2

    # round 1: honest votes on the base model's answers -> better model -> canary -> promoted
    lab.traffic(400, rng)
    ck1 = lab.gate(lab.train())
    assert ck1["stage"] == "canary", ck1["reason"]
    assert _run_canary(lab, rng) == "promoted"
    history.append(_production(lab))
    assert history[-1][0] == ck1["model_version"] and history[-1][2] > history[0][2] + 0.5
    # ...and it is the line's π_ref now
    with lab.engine.connect() as conn:
        assert registry.production_source(conn, lab.settings, "default") == ck1["artifact_path"]

    # round 2: flipped thumbs -> the model gets worse at the task -> the gate rejects it. The
    # job covers the bug's window only: mixed with the honest votes sent during round 1's canary
    # its held-out margin lands near 0, on either side depending on the CPU's float rounding
    bug = {"since": _now()}
    lab.traffic(1200, rng, invert=True)
    ck2 = lab.gate(lab.train(max_steps=80, filters=bug))
    assert ck2["stage"] == "rejected" and "task score" in ck2["reason"], ck2["metrics"]
    assert ck2["metrics"]["eval"]["margin"] > 0  # the held-out margin alone would pass it
    assert ck2["parent_id"] == ck1["id"]  # trained against round 1's model as π_ref
    history.append(_production(lab))

    # round 3: flipped thumbs again, and a gate without a task evaluator (and a loose KL
    # bound): the model passes it, but live users like it less -> the guard rolls it back
    bug = {"since": _now()}
    lab.traffic(1200, rng, invert=True)
    ck3 = lab.gate(lab.train(max_steps=80, filters=bug), settings=loose_gate)
    assert ck3["stage"] == "canary", ck3["reason"]
    assert _run_canary(lab, rng) == "rolled_back"
    with lab.engine.connect() as conn:
        ck3 = registry.get_checkpoint(conn, ck3["id"])
    assert ck3["stage"] == "rejected" and "guard" in ck3["reason"]
    history.append(_production(lab))

    # round 4: honest votes (collected while the canary ran) -> whatever happens, production
    # stays at least as good, and the lineage is base -> ck1 -> (ck4)
    ck4 = lab.gate(lab.train())
    outcome = _run_canary(lab, rng) if ck4["stage"] == "canary" else ck4["stage"]
    history.append(_production(lab))
    assert ck4["parent_id"] == ck1["id"]
    if outcome == "promoted":
        r = lab.client.get(f"/v1/checkpoints/{ck4['id']}", headers=lab.env.headers("read"))
        chain = [step.get("checkpoint_id") for step in r.json()["lineage"]]
        assert chain == [ck4["id"], ck1["id"], None]

    accs = [round(h[2], 3) for h in history]
    for before, after in zip(accs, accs[1:], strict=False):
        assert after >= before - lab.settings.guard_noninferiority_margin - 0.03, accs
    assert accs[-1] >= accs[1] - 0.05, accs
    # every stage change of the loop is in the audit trail
    with lab.engine.connect() as conn:
        events = registry.list_events(conn, line="default", checkpoint_id=None, limit=1000,
                                      before_id=None)
    actors = {(e["action"], e["actor"]) for e in events}
    assert {("passed", "gate"), ("rejected", "gate"), ("canary", "gate"),
            ("production", "guard"), ("rollback", "guard")} <= actors
    print(f"\n[loop] production accuracy per round: {accs}; round 4: {outcome}")
