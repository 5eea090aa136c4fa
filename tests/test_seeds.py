import pytest

from segdist.config import expand_configs, parse_study, trial_key, with_seed
from segdist.seeds import SeedScheduler


def configs_and_policy(seeds, n_configs=2):
    study = parse_study({"seeds": seeds, "search": {"train.lr": {"grid": [0.01 * (i + 1) for i in range(n_configs)]}}},
                        "s.yaml")
    return expand_configs(study), study.seeds


def drain(scheduler, metric_of):
    """Run the scheduler to the end; metric_of(config_index, seed) plays the training."""
    ids = list(scheduler.configs)
    ran = []
    while not scheduler.done():
        trial = scheduler.next_trial()
        assert trial is not None
        ran.append((ids.index(trial.config_id), trial.seed))
        scheduler.record(trial, metric_of(ids.index(trial.config_id), trial.seed))
    return ran


def test_fixed_seeds_run_each_configuration_once_per_seed():
    configs, policy = configs_and_policy([0, 1, 2])
    ran = drain(SeedScheduler(configs, policy), lambda c, s: 0.5)
    assert sorted(ran) == [(c, s) for c in (0, 1) for s in (0, 1, 2)]


def test_adaptive_seeds_stop_a_clearly_worse_configuration_early():
    configs, policy = configs_and_policy({"min": 2, "max": 8, "ci_halfwidth": 0.1})
    # config 0 is noisy around 0.60; config 1 is far below, tight.
    noise = [0.0, 0.02, -0.02, 0.01, -0.01, 0.015, -0.015, 0.005]
    scheduler = SeedScheduler(configs, policy)
    ran = drain(scheduler, lambda c, s: (0.60 + noise[s]) if c == 0 else (0.30 + noise[s] / 10))
    seeds_per_config = {c: sum(1 for cc, _ in ran if cc == c) for c in (0, 1)}
    assert seeds_per_config[1] < seeds_per_config[0] <= 8
    decisions = scheduler.decisions()
    assert "no longer overlaps" in decisions[configs[1].config_id]["stop_reason"]


def test_adaptive_seeds_stop_at_the_interval_target():
    configs, policy = configs_and_policy({"min": 2, "max": 8, "ci_halfwidth": 5.0}, n_configs=1)
    ran = drain(SeedScheduler(configs, policy), lambda c, s: 0.5 + 0.001 * s)
    assert len(ran) == 2


def test_adaptive_seeds_never_pass_the_maximum():
    configs, policy = configs_and_policy({"min": 2, "max": 4, "ci_halfwidth": 0.001})
    ran = drain(SeedScheduler(configs, policy), lambda c, s: 0.5 + (0.05 if s % 2 else -0.05))
    assert all(sum(1 for cc, _ in ran if cc == c) == 4 for c in (0, 1))


def test_failed_trials_count_toward_the_maximum():
    configs, policy = configs_and_policy({"min": 2, "max": 3, "ci_halfwidth": 0.001}, n_configs=1)
    ran = drain(SeedScheduler(configs, policy), lambda c, s: None)
    assert len(ran) == 3


def test_finished_trials_of_a_resumed_study_are_not_run_again():
    configs, policy = configs_and_policy([0, 1])
    done = {trial_key(with_seed(configs[0], 0)): (0.5, False)}
    ran = drain(SeedScheduler(configs, policy, ended=done), lambda c, s: 0.5)
    assert (0, 0) not in ran and len(ran) == 3


def interrupted(scheduler, value_of, stop_after=None, faulty=()):
    """Play a study until `stop_after` trials ended and the next one started (then its driver
    is killed), or to its end: returns (ended trials as run_study reads them back: key ->
    (value, fault), the keys of the trials started)."""
    ended, started = {}, []
    while not scheduler.done():
        trial = scheduler.next_trial()
        started.append(trial_key(trial))
        if len(ended) == stop_after:
            break
        fault = trial.seed in faulty
        value = None if fault else value_of(trial.config_id, trial.seed)
        scheduler.record(trial, value, fault=fault)
        ended[trial_key(trial)] = (value, fault)
    return ended, started


@pytest.mark.parametrize("stop_after", range(10))
@pytest.mark.parametrize("faulty", [(), (3,)])
def test_a_resumed_adaptive_study_runs_what_the_uninterrupted_one_would_and_nothing_twice(stop_after, faulty):
    """Extra rounds and replacements included: an ended trial is replayed, never queued; the
    one running when the driver died runs again (from its checkpoint)."""
    configs, policy = configs_and_policy({"min": 2, "max": 6, "ci_halfwidth": 0.5})
    noise = [0.0, 0.03, -0.03, 0.02, -0.02, 0.01, -0.01, 0.0, 0.0, 0.0, 0.0, 0.0]
    best = configs[0].config_id

    def value_of(config_id, seed):
        return (0.60 if config_id == best else 0.58) + noise[seed]

    whole = SeedScheduler(configs, policy)
    _, uninterrupted = interrupted(whole, value_of, faulty=faulty)
    assert len(uninterrupted) > 10  # extra rounds (and a replacement of seed 3 where it fails)
    ended, started = interrupted(SeedScheduler(configs, policy), value_of, stop_after, faulty=faulty)
    resumed = SeedScheduler(configs, policy, ended=ended)
    _, after = interrupted(resumed, value_of, faulty=faulty)
    assert not set(ended) & set(after)  # no ended trial runs again
    assert started[-1] in after  # the running one is not lost
    assert sorted([*ended, *after]) == sorted(uninterrupted)  # the same trials, and each once
    assert resumed.decisions() == whole.decisions()


@pytest.mark.parametrize("outcome", [(None, False), (None, True)])  # stopped early or diverged; failed
def test_a_trial_that_ended_without_a_value_is_not_run_again(outcome):
    configs, policy = configs_and_policy([0, 1], n_configs=1)
    scheduler = SeedScheduler(configs, policy, ended={trial_key(with_seed(configs[0], 0)): outcome})
    assert [seed for _, seed in drain(scheduler, lambda c, s: 0.5)] == [1]
    assert scheduler.decisions()[configs[0].config_id]["failed_seeds"] == [0]


def run_with_faults(scheduler, value_of, faulty):
    """Drain the scheduler; seeds in `faulty` fail for good (outcome.FAILED)."""
    ran = []
    while not scheduler.done():
        trial = scheduler.next_trial()
        ran.append(trial.seed)
        scheduler.record(trial, None if trial.seed in faulty else value_of(trial.seed), fault=trial.seed in faulty)
    return ran


def test_a_seed_that_failed_for_good_is_replaced_by_the_next_under_adaptive_seeds():
    configs, policy = configs_and_policy({"min": 2, "max": 3, "ci_halfwidth": 5.0}, n_configs=1)
    scheduler = SeedScheduler(configs, policy)
    ran = run_with_faults(scheduler, lambda s: 0.5 + 0.001 * s, faulty={1})
    assert ran == [0, 1, 2]  # seed 2 in place of 1; two values then meet the interval target
    decision = scheduler.decisions()[configs[0].config_id]
    assert decision["replaced_seeds"] == {"1": 2}
    assert decision["seeds"] == [0, 2] and decision["failed_seeds"] == [1]


def test_replacements_are_bounded_when_every_seed_fails():
    configs, policy = configs_and_policy({"min": 2, "max": 3, "ci_halfwidth": 0.001}, n_configs=1)
    scheduler = SeedScheduler(configs, policy)
    ran = run_with_faults(scheduler, lambda s: 0.5, faulty=set(range(100)))
    assert len(ran) == 6  # max_seeds tries plus at most max_seeds replacements
    assert "max seeds" in scheduler.decisions()[configs[0].config_id]["stop_reason"]


def test_fixed_seeds_keep_a_failed_seed_as_a_failure():
    configs, policy = configs_and_policy([0, 1, 2], n_configs=1)
    scheduler = SeedScheduler(configs, policy)
    assert run_with_faults(scheduler, lambda s: 0.5, faulty={1}) == [0, 1, 2]
    assert scheduler.decisions()[configs[0].config_id]["replaced_seeds"] == {}
