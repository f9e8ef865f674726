"""One writer per campaign: the lease in the run store (local and S3), and both drivers holding it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

import pytest
from helpers.campaign_killer import wait_until
from helpers.tiny_campaign import campaign_dict

from slime_wf.campaign import Campaign
from slime_wf.config import CampaignConfig
from slime_wf.ledger import (
    LEASE,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    machine_identity,
    process_state,
    read_lease,
)
from slime_wf.store import RunStore, StoreConflict


@pytest.fixture
def store(store_root):
    return RunStore(f"{store_root}/camp")


def _foreign_holder(**fields):
    now = time.time()
    return {
        "host": "elsewhere",
        "boot_id": "b",
        "pid_namespace": "ns",
        "pid": 4242,
        "pid_started_at": 1.0,
        "token": "theirs",
        "started_at": now - 3600,
        "heartbeat_at": now,
        "timeout_s": 120.0,
        "released_at": None,
        **fields,
    }


def test_second_holder_is_refused_with_the_holder_named(store):
    first = Lease(store, timeout_s=120, campaign="camp").acquire()
    try:
        with pytest.raises(LeaseHeldError) as err:
            Lease(store, timeout_s=120, campaign="camp").acquire()
        message = str(err.value)
        record = read_lease(store)
        assert record["token"] == first.token
        assert (
            f"host {record['host']}" in message and f"pid {record['pid']}" in message and "since " in message
        )
        assert "another campaign name" in message and "lease_timeout_s" in message
    finally:
        first.release()
    assert read_lease(store)["released_at"] is not None
    with Lease(store, timeout_s=120) as second:  # a released lease is free
        assert read_lease(store)["token"] == second.token


def test_live_holder_elsewhere_is_refused_and_a_silent_one_taken_over(store, caplog):
    store.write_json(LEASE, _foreign_holder())
    with pytest.raises(LeaseHeldError, match="host elsewhere, pid 4242"):
        Lease(store, timeout_s=120).acquire()

    store.write_json(LEASE, _foreign_holder(heartbeat_at=time.time() - 600))
    with caplog.at_level(logging.WARNING, logger="slime_wf.ledger"), Lease(store, timeout_s=120) as lease:
        assert read_lease(store)["token"] == lease.token
    assert (
        "taking over the lease of host elsewhere pid 4242" in caplog.text and "last heartbeat" in caplog.text
    )


def test_holder_whose_process_died_on_this_host_is_taken_over_at_once(store, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert process_state(dead.pid) == (False, None)
    # a fresh heartbeat and a long timeout: only the dead pid makes it stale (a train restarted after kill -9)
    store.write_json(
        LEASE, _foreign_holder(**machine_identity(), pid=dead.pid, heartbeat_at=time.time(), timeout_s=1e6)
    )
    with caplog.at_level(logging.WARNING, logger="slime_wf.ledger"), Lease(store, timeout_s=120) as lease:
        assert read_lease(store)["token"] == lease.token
    assert f"its process {dead.pid} on this host is gone" in caplog.text


def test_reused_pid_on_this_host_does_not_keep_a_lease(store, caplog):
    # the holder's pid is alive, but it is a younger process than the one that took the lease
    store.write_json(
        LEASE, _foreign_holder(**machine_identity(), pid=os.getpid(), pid_started_at=1.0, timeout_s=1e6)
    )
    with caplog.at_level(logging.WARNING, logger="slime_wf.ledger"), Lease(store, timeout_s=120):
        pass
    assert "now belongs to another process" in caplog.text


def test_heartbeat_renews_and_notices_a_takeover(store):
    lease = Lease(store, timeout_s=120, heartbeat_s=0.05).acquire()
    try:
        first_beat = read_lease(store)["heartbeat_at"]
        wait_until(lambda: read_lease(store)["heartbeat_at"] > first_beat, "a heartbeat")

        # another train takes the lease over (as it would once this holder looked stale), racing the heartbeat
        def take_over():
            try:
                return store.write_if(
                    LEASE, json.dumps(_foreign_holder()).encode(), version=store.read_versioned(LEASE)[1]
                )
            except StoreConflict:
                return None

        wait_until(take_over, "a takeover between two heartbeats")
        wait_until(lambda: lease.lost, "the heartbeat to notice the takeover")
        with pytest.raises(LeaseLostError, match="lost its writer lease .* taken by host elsewhere pid 4242"):
            lease.check()
        with pytest.raises(LeaseLostError):
            lease.confirm()
    finally:
        lease.release()
    assert read_lease(store)["token"] == "theirs"  # releasing a lost lease leaves the new holder's record


def test_confirm_renews_synchronously(store):
    with Lease(store, timeout_s=120, heartbeat_s=3600) as lease:
        before = read_lease(store)["heartbeat_at"]
        wait_until(lambda: time.time() > before, "the clock to move")
        lease.confirm()
        assert read_lease(store)["heartbeat_at"] > before


def test_concurrent_starters_exactly_one_wins(tmp_path):
    """Locally the compare-and-swap runs under flock. (moto checks S3's conditions without a lock, so a
    race against it would test moto, not this code; AWS S3 evaluates them atomically.)"""
    store = RunStore(str(tmp_path / "store" / "camp"))
    barrier = threading.Barrier(8)
    outcomes: list[object] = []

    def start():
        lease = Lease(store, timeout_s=120)
        barrier.wait()
        try:
            outcomes.append(lease.acquire())
        except LeaseHeldError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    winners = [o for o in outcomes if isinstance(o, Lease)]
    assert len(winners) == 1 and len(outcomes) == 8
    assert read_lease(store)["token"] == winners[0].token
    winners[0].release()


# ---- the drivers hold the lease -----------------------------------------------------------------


def _config(tmp_path, store_root: str, **model) -> CampaignConfig:
    cfg = campaign_dict(tmp_path, store_root, "leased")
    cfg["model"].update(model)
    cfg["storage"]["scratch_dir"] = str(tmp_path / "scratch")
    return CampaignConfig.from_dict(cfg)


def test_a_second_train_fails_fast_before_touching_the_store(tmp_path, store_root):
    cfg = _config(tmp_path, store_root)  # the model does not exist: nothing may get as far as loading it
    store = RunStore.for_campaign(cfg)
    with Lease(store, timeout_s=120):
        with pytest.raises(LeaseHeldError, match="campaign leased is being trained by another process"):
            Campaign(cfg).run()
        with Campaign(cfg) as campaign, pytest.raises(LeaseHeldError):
            campaign.start()
    assert store.listdir() == [LEASE]  # no manifest, no config.yaml, nothing deleted


def test_plain_loop_releases_the_lease_when_it_fails(tmp_path, store_root):
    cfg = _config(tmp_path, store_root, hf_checkpoint=str(tmp_path / "no-such-model"))
    store = RunStore.for_campaign(cfg)
    campaign = Campaign(cfg)
    with pytest.raises(Exception, match="no-such-model"):
        campaign.run()
    assert read_lease(store)["released_at"] is not None
    with Lease(store, timeout_s=120):  # and the next writer gets it
        pass


@pytest.mark.slow  # a real Prefect server
def test_train_flow_holds_the_lease_and_releases_it_on_failure(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.campaign

    cfg = _config(tmp_path, str(tmp_path / "store"), hf_checkpoint=str(tmp_path / "no-such-model"))
    store = RunStore.for_campaign(cfg)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        with Lease(store, timeout_s=120):
            with pytest.raises(LeaseHeldError, match="is being trained by another process"):
                flows.campaign.train(cfg)
        with pytest.raises(Exception, match="no-such-model"):  # holds the lease, then fails in prepare
            flows.campaign.train(cfg)
    record = read_lease(store)
    assert record["pid"] == os.getpid() and record["released_at"] is not None
