"""Which trial to run next: every configuration over its seeds, fixed or adaptive.

Adaptive seeds work in rounds. Every configuration starts with its initial seeds; when a
round has finished, a configuration gets one more seed only if its 95% interval is still
wider than the target and still overlaps the best configuration's interval (the best one
keeps going until its own interval is narrow enough), up to `max_seeds`. So compute goes where
the ranking is still uncertain. Every stop has a reason, for the report.

A seed whose trial failed for good (an error after its retries, not a divergence or an ASHA
stop, which are results) leaves no hole: under adaptive seeds the next round runs the next
seed in its place, outside the `max_seeds` budget (at most `max_seeds` replacements per
configuration), and the decisions say which seed replaced which.

Resume: `ended` holds the trials of the interrupted run that ended (finished, failed,
diverged or stopped early), with what `record` was told about each. The scheduler plans the
same rounds again, and a trial it plans that already ended is recorded at once instead of
queued: the rounds of a resumed study are the uninterrupted study's, adaptive seeds' extra
rounds and replacements included, and no ended trial runs twice; every other trial (it was
running, or not started) is queued.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from segdist.config import SeedPolicy, TrialConfig, trial_key, with_seed
from segdist.stats import summarize

# The decisions compare intervals of the headline metric (segdist.stats.HEADLINE_METRIC, final_miou,
# 0..1) that the searcher records; targets are given in points (x100).
POINTS = 100.0


@dataclass
class ConfigSeeds:
    config: TrialConfig
    values: dict[int, float] = field(default_factory=dict)  # seed -> final metric
    failed: set[int] = field(default_factory=set)  # no value: failed, diverged or stopped early
    faults: set[int] = field(default_factory=set)  # of those, failed for good (an error)
    replaced: dict[int, int] = field(default_factory=dict)  # failed seed -> the seed run in its place
    stop_reason: str | None = None

    @property
    def tried(self) -> int:
        """Seeds counted against max_seeds: a replaced failure is not."""
        return len(self.values) + len(self.failed) - len(self.replaced)

    def unreplaced_fault(self) -> int | None:
        return min(self.faults - set(self.replaced), default=None)

    def next_seed(self) -> int:
        used = set(self.values) | self.failed
        return max(used, default=-1) + 1


Ended = tuple[float | None, bool]  # what SeedScheduler.record was told: (value, fault)


class SeedScheduler:
    def __init__(self, configs: list[TrialConfig], policy: SeedPolicy, ended: dict[str, Ended] | None = None):
        """`ended`: trial key -> (final metric or None, failed for good) of every trial of a
        resumed study that already ended; they are never queued (module docstring)."""
        self.policy = policy
        self.configs = {c.config_id: ConfigSeeds(c) for c in configs}
        self.queue: deque[TrialConfig] = deque()
        self.running: set[str] = set()
        self.ended = dict(ended or {})
        for state in self.configs.values():
            for seed in policy.initial:
                self._add(with_seed(state.config, seed))

    def _add(self, trial: TrialConfig) -> None:
        """Queue a planned trial, or, if it already ended (resume), record how."""
        if trial_key(trial) in self.ended:
            self.record(trial, *self.ended.pop(trial_key(trial)))
        else:
            self.queue.append(trial)

    def _refill(self) -> None:
        """Plan rounds while nothing is queued or running and planning adds trials (a
        resumed study replays rounds whose trials all ended)."""
        while not self.queue and not self.running and self._plan_next_round():
            pass

    def next_trial(self) -> TrialConfig | None:
        """The next trial to start, or None when the current round must finish first."""
        self._refill()
        if not self.queue:
            return None
        trial = self.queue.popleft()
        self.running.add(trial_key(trial))
        return trial

    def record(self, trial: TrialConfig, value: float | None, fault: bool = False) -> None:
        """A trial ended: its final metric, or None if it failed, diverged or was stopped;
        `fault`: it failed for good (outcome.FAILED), so adaptive seeds replace it."""
        self.running.discard(trial_key(trial))
        state = self.configs[trial.config_id]
        if value is None:
            state.failed.add(trial.seed)
            if fault:
                state.faults.add(trial.seed)
        else:
            state.values[trial.seed] = value

    def done(self) -> bool:
        """No trial queued or running, and no further round to plan."""
        self._refill()
        return not self.queue and not self.running

    def decisions(self) -> dict[str, dict]:
        return {
            config_id: {
                "seeds": sorted(state.values),
                "failed_seeds": sorted(state.failed),
                "replaced_seeds": {str(seed): new for seed, new in sorted(state.replaced.items())},
                "stop_reason": state.stop_reason or "fixed seeds",
            }
            for config_id, state in self.configs.items()
        }

    # ------------------------------------------------------------------ rounds

    def _plan_next_round(self) -> int:
        """Add the next round's trials (adaptive seeds); returns how many were planned."""
        if not self.policy.adaptive:
            return 0
        planned = 0
        open_configs = [s for s in self.configs.values() if s.stop_reason is None]
        summaries = {s.config.config_id: summarize(list(s.values.values())) for s in self.configs.values()}
        ranked = [s for s in self.configs.values() if summaries[s.config.config_id].n >= 1]
        best = max(ranked, key=lambda s: summaries[s.config.config_id].mean, default=None)
        for state in open_configs:
            summary = summaries[state.config.config_id]
            fault = state.unreplaced_fault()
            if fault is not None and len(state.replaced) < self.policy.max_seeds:
                state.replaced[fault] = state.next_seed()
                self._add(with_seed(state.config, state.replaced[fault]))
                planned += 1
                continue
            if state.tried >= self.policy.max_seeds:
                state.stop_reason = f"reached max seeds ({self.policy.max_seeds})"
                continue
            if summary.n >= 2 and summary.halfwidth * POINTS <= self.policy.ci_halfwidth:
                state.stop_reason = (
                    f"95% CI half-width {summary.halfwidth * POINTS:.2f} <= {self.policy.ci_halfwidth:g}"
                )
                continue
            if best is not None and summary.n >= 2 and not self._still_contested(state, best, summaries):
                state.stop_reason = "95% CI no longer overlaps the best configuration's"
                continue
            self._add(with_seed(state.config, state.next_seed()))
            planned += 1
        return planned

    def _still_contested(self, state: ConfigSeeds, best: ConfigSeeds, summaries) -> bool:
        """The best configuration always is (its own number should become precise)."""
        if state is best:
            return True
        return summaries[state.config.config_id].overlaps(summaries[best.config.config_id])
