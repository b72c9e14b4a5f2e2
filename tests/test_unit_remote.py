"""Remote management without a broker: desired documents, plans, group commands (fakes at the seams)."""

from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_unit_agent import FakePublisher, FakeRecorder, FakeUploads, Harness, make_config
from test_unit_discovery import SubscribingPublisher

from edge_agent import remoteconfig
from edge_agent.agent import Agent, RemoteSetup
from edge_agent.config import AgentConfig
from edge_agent.events import MessageReceived
from edge_agent.journal import Journal
from edge_agent.management import load_desired
from edge_agent.messages import decode_group_command
from edge_agent.remoteconfig import Desired, Rejected

P_D = "edge/edge-01"
DESIRED = f"{P_D}/config/desired"
REPORTED = f"{P_D}/config/reported"
CAM_URL = "rtsp://admin:camPw-remote-77@10.0.0.9/stream"


def local_raw(tmp: Path) -> dict[str, Any]:
    return {"device_id": "edge-01", "mqtt": {"topic_prefix": "edge"},
            "cameras": {"cam1": {"url": "rtsp://10.0.0.5/s"}},
            "recording": {"output_dir": str(tmp / "rec"), "ffmpeg_path": "ffmpeg"},
            "storage": {"type": "local", "min_free_bytes": 0}}  # fmt: skip


def doc(version: Any, config: Any) -> bytes:
    return json.dumps({"version": version, "config": config}).encode()


# ---- parse, merge, validate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (b"not json", "(document)"),
        (b"[1]", "(document)"),
        (doc(0, {}), "version"),
        (doc("3", {}), "version"),
        (doc(True, {}), "version"),
        (doc(1, []), "config"),
        (doc(1, {"mqtt": {"host": "evil"}}), "mqtt"),
        (doc(1, {"device_id": "other"}), "device_id"),
        (doc(1, {"bogus": 1}), "bogus"),
        (doc(1, {"recording": {"ffmpeg_path": "/bin/sh"}}), "recording.ffmpeg_path"),
        (doc(1, {"recording": {"output_dir": "/"}}), "recording.output_dir"),
        (doc(1, {"storage": {"secret_key_file": "/etc/shadow"}}), "storage.secret_key_file"),
        (doc(1, {"cameras": {"c": {"url_file": "/etc/passwd"}}}), "cameras.c.url_file"),
        (doc(1, {"cameras": {"c": {"url": "rtsp://x/", "buffer_dir": "/"}}}), "cameras.c.buffer_dir"),
        (json.dumps({"version": 1, "config": {}, "extra": 1}).encode(), "extra"),
    ],
)
def test_parse_desired_names_each_problem(payload: bytes, path: str) -> None:
    with pytest.raises(Rejected) as info:
        remoteconfig.parse_desired(payload, 65536)
    assert path in [p.path for p in info.value.problems], info.value.problems


def test_parse_desired_size_limit_first() -> None:
    with pytest.raises(Rejected, match="exceeds"):
        remoteconfig.parse_desired(b"{" * 70000, 65536)


def test_build_replaces_keys_whole_and_keeps_local_ones(tmp_path: Path) -> None:
    raw = local_raw(tmp_path)
    cfg = remoteconfig.build(raw, Desired(2, {"cameras": {"cam9": {"url": CAM_URL}},
                                             "recording": {"max_seconds": 60}, "groups": ["g1"]}))  # fmt: skip
    assert set(cfg.cameras) == {"cam9"} and cfg.recording.max_seconds == 60 and cfg.groups == ["g1"]
    assert cfg.recording.output_dir == tmp_path / "rec"  # local-only keys survive a replaced section
    assert cfg.storage.type == "local"  # absent: the local value
    assert raw["cameras"] == {"cam1": {"url": "rtsp://10.0.0.5/s"}}  # the base is never modified
    assert remoteconfig.build(raw, Desired(3, {})).cameras.keys() == {"cam1"}  # {} is the local file


def test_build_rejects_with_key_paths(tmp_path: Path) -> None:
    with pytest.raises(Rejected) as info:
        remoteconfig.build(local_raw(tmp_path), Desired(4, {"cameras": {"cam1": {}}, "recording": {"max_seconds": 0},
                                                            "groups": ["a/b"]}))  # fmt: skip
    paths = {p.path for p in info.value.problems}
    assert {"cameras.cam1.url", "recording.max_seconds", "groups"} <= paths, paths
    assert info.value.version == 4


def test_redacted_hides_every_secret(tmp_path: Path) -> None:
    raw = local_raw(tmp_path)
    cfg = remoteconfig.build(raw, Desired(1, {"cameras": {"cam1": {"url": CAM_URL}},
                                             "storage": {"type": "minio", "access_key": "AKIA-remote",
                                                         "secret_key": "sk-remote-very-secret"}}))  # fmt: skip
    text = json.dumps(remoteconfig.redacted(cfg))
    assert "camPw-remote-77" not in text and "sk-remote-very-secret" not in text and "AKIA-remote" not in text
    assert "10.0.0.9/stream" in text  # the host stays readable


def test_plan_keeps_busy_cameras(tmp_path: Path) -> None:
    raw = local_raw(tmp_path)
    raw["cameras"]["cam2"] = {"url": "rtsp://10.0.0.6/s"}
    current = remoteconfig.build(raw, None)
    target = remoteconfig.build(raw, Desired(1, {"cameras": {"cam2": {"url": "rtsp://10.0.0.7/s"}},
                                                "storage": {"type": "local", "min_free_bytes": 1}}))  # fmt: skip
    p = remoteconfig.plan(current, target, {"cam1": "t1"})
    assert [x.path for x in p.pending] == ["cameras.cam1"]
    assert p.effective.cameras["cam1"] == current.cameras["cam1"]  # removed later
    assert p.effective.cameras["cam2"] == target.cameras["cam2"]  # not busy: changed now
    assert p.effective.storage == target.storage  # at once (waiting uploads move to the new store)
    done = remoteconfig.plan(current, target, {})
    assert done.complete and done.effective == target


# ---- the agent with remote management (fakes) -------------------------------------------------------


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    journals: list[Journal] = []

    def factory(raw: dict[str, Any] | None = None, pub: FakePublisher | None = None) -> Harness:
        raw = raw or local_raw(tmp_path)
        journal = Journal(tmp_path / "rec" / ".edge-agent.sqlite3")
        journals.append(journal)
        cfg, desired, at, problem = load_desired(journal, raw)
        cfg = cfg or remoteconfig.build(raw, None)
        pub = pub or SubscribingPublisher()
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        recorders: list[Any] = []

        def new_recorder(spec: Any, post: Any, finalise_only: bool) -> Any:
            rec = FakeRecorder(spec, post, finalise_only)
            recorders.append(rec)
            return rec

        uploads = FakeUploads()
        agent = Agent(cfg, pub, journal, uploads, events, recorder_factory=new_recorder,
                      remote=RemoteSetup(raw, desired, at, problem))  # fmt: skip
        assert agent.resolve_ffmpeg() is None
        return Harness(agent, pub, uploads, recorders, journal, tmp_path)

    yield factory
    for j in journals:
        j.close()


def send(h: Harness, topic: str, payload: bytes) -> None:
    h.agent.handle(MessageReceived(topic, payload))


def test_subscribes_desired_and_groups(remote: Callable[..., Harness], tmp_path: Path) -> None:
    raw = local_raw(tmp_path)
    raw["groups"] = ["site-a"]
    h = remote(raw)
    assert isinstance(h.pub, SubscribingPublisher)
    assert DESIRED in h.pub.subscriptions and "edge/groups/site-a/cmd" in h.pub.subscriptions
    send(h, DESIRED, doc(1, {"groups": ["site-b"]}))
    assert "edge/groups/site-b/cmd" in h.pub.subscriptions and "edge/groups/site-a/cmd" not in h.pub.subscriptions


def test_versions_stale_same_and_deleted(remote: Callable[..., Harness]) -> None:
    h = remote()
    send(h, DESIRED, doc(5, {"recording": {"max_seconds": 70}}))
    assert h.pub.retained(REPORTED)["version"] == 5  # type: ignore[index]
    send(h, DESIRED, doc(4, {"recording": {"max_seconds": 80}}))
    rep = h.pub.retained(REPORTED)
    assert rep is not None and rep["version"] == 5 and rep["rejected"]["version"] == 4
    assert "stale" in rep["rejected"]["errors"][0]["message"] and h.agent.cfg.recording.max_seconds == 70
    send(h, DESIRED, doc(5, {"recording": {"max_seconds": 90}}))
    rep = h.pub.retained(REPORTED)
    assert rep is not None and rep["rejected"]["version"] == 5 and h.agent.cfg.recording.max_seconds == 70
    send(h, DESIRED, doc(6, {"recording": {"max_seconds": 90}}))
    rep = h.pub.retained(REPORTED)
    assert rep is not None and rep["version"] == 6 and rep["rejected"] is None  # a newer version clears it
    send(h, DESIRED, b"")  # deleted on the broker: keep running
    assert h.agent.cfg.recording.max_seconds == 90


def test_restart_runs_stored_version_and_survives_a_changed_local_file(
    remote: Callable[..., Harness], tmp_path: Path
) -> None:
    h = remote()
    send(h, DESIRED, doc(2, {"cameras": {"cam7": {"url": CAM_URL}}}))
    h.journal.close()
    again = remote()
    assert set(again.agent.cfg.cameras) == {"cam7"}
    rep = again.agent.manage.reported_doc() if again.agent.manage else {}
    assert rep["version"] == 2 and rep["applied_at"]
    again.journal.close()
    broken = local_raw(tmp_path)
    broken["recording"]["segment_seconds"] = 4
    broken["storage"] = {"type": "local", "min_free_bytes": 0, "bogus_key": 1}  # the local file went bad
    journal = Journal(tmp_path / "rec" / ".edge-agent.sqlite3")
    try:
        cfg, desired, _, problem = load_desired(journal, broken)
    finally:
        journal.close()
    assert cfg is None and desired is None and problem is not None
    assert "storage.bogus_key" in str(problem)


def test_changed_camera_waits_for_its_task(remote: Callable[..., Harness]) -> None:
    h = remote()
    h.start("t1")
    send(h, DESIRED, doc(1, {"cameras": {"cam1": {"url": CAM_URL}}}))
    rep = h.pub.retained(REPORTED)
    assert rep is not None and rep["state"] == "pending" and rep["pending"][0]["path"] == "cameras.cam1"
    assert h.agent.cfg.cameras["cam1"].url.get_secret_value() == "rtsp://10.0.0.5/s"  # running task untouched
    h.cmd({"action": "stop", "task_name": "t1"})
    rec = h.recorders[-1]
    h.finish(rec)
    rep = h.pub.retained(REPORTED)
    assert rep is not None and rep["state"] == "applied", rep
    assert h.agent.cfg.cameras["cam1"].url.get_secret_value() == CAM_URL
    assert "camPw-remote-77" not in h.pub.all_text().replace(json.dumps(CAM_URL), "")


def test_group_command_once_and_per_camera_results(remote: Callable[..., Harness], tmp_path: Path) -> None:
    raw = local_raw(tmp_path)
    raw["groups"] = ["all"]
    raw["cameras"]["cam2"] = {"url": "rtsp://10.0.0.6/s"}
    h = remote(raw)
    topic, reply_topic = "edge/groups/all/cmd", f"{P_D}/groups/all/reply"
    cmd = json.dumps({"action": "start", "request_id": "g-1", "cameras": ["cam1", "cam9"]}).encode()
    send(h, topic, cmd)
    send(h, topic, cmd)  # redelivered
    replies = [json.loads(p) for t, p, _ in h.pub.published if t == reply_topic]
    assert len(replies) == 1
    r = replies[0]
    assert r["ok"] is False and r["results"]["cam1"]["ok"] is True and r["results"]["cam9"]["ok"] is False
    assert "cam2" not in r["results"] and len(h.recorders) == 1
    send(h, topic, json.dumps({"action": "stop", "request_id": "g-2"}).encode())
    stop = json.loads([p for t, p, _ in h.pub.published if t == reply_topic][-1])
    assert stop["results"]["cam1"]["ok"] is True and stop["results"]["cam2"]["status"] == "not_running"
    # After a restart, a redelivered request is answered again from the journal, not executed.
    h.journal.close()
    again = remote(raw)
    send(again, topic, cmd)
    assert [json.loads(p) for t, p, _ in again.pub.published if t == reply_topic] == [r]
    assert not again.recorders


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"action": "start"}, "request_id is required"),
        ({"action": "query", "request_id": "x"}, "action"),
        ({"action": "start", "request_id": "x", "cameras": ["a/b"]}, "cameras[]"),
        ({"action": "start", "request_id": "x", "cameras": "all"}, "cameras"),
        ({"action": "start", "request_id": "x", "task_name": "../x"}, "task_name"),
        ({"action": "start", "request_id": "x", "bogus": 1}, "bogus"),
    ],
)
def test_group_command_bad_input_named(payload: dict[str, Any], needle: str) -> None:
    cmd, _, error = decode_group_command(json.dumps(payload).encode(), 4096)
    assert cmd is None and error is not None and needle in error, error


def test_reserved_ids(tmp_path: Path) -> None:
    raw = local_raw(tmp_path)
    raw["device_id"] = "groups"
    with pytest.raises(Exception, match="reserved"):
        AgentConfig.model_validate(raw)
    assert make_config  # the shared harness stays importable
