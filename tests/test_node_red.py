"""The Node-RED example flow (``deploy/node-red/flow.json``) against a real Node-RED, end to end.

Real Node-RED 4 (installed by ``scripts/install-node-red.sh`` into ``.node-red/``), real Mosquitto,
the GStreamer camera simulator, FFmpeg and the agent with local storage. The test deploys the flow
through Node-RED's admin HTTP API and presses its inject buttons through the same API
(``POST /inject/<id>``), exactly as a user clicking them in the editor would.

How the test sees what Node-RED received: it deploys a *test-only copy* of the flow, in which the
broker node points at the test's Mosquitto and the topics at the rig's prefix/device, plus three
test-only nodes on the same tab: a function ``collect events`` wired to the events ``mqtt in``
(appends every event to flow context), and an ``http in`` GET ``/edge-agent-test/state`` ->
function -> ``http response`` that returns ``{"status", "lastRecording", "events"}`` from the flow
context. ``status`` is stored by the flow's own ``show task status`` function and ``lastRecording``
by its own ``on recording ready`` function (reached only through the ``switch`` on
``uploaded``/``completed``), so the assertions cover the shipped nodes, not test stand-ins.
Plain HTTP polling is robust: no websocket to the editor's debug sidebar, no files written by
function nodes, no timing assumptions beyond bounded waits.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from parts import LOCALHOST, ROOT, ManagedProcess, PartError, ffprobe_info, free_port, moov_before_mdat
from rig import make_rig, record_for

FLOW_FILE = ROOT / "deploy" / "node-red" / "flow.json"
INSTALLER = ROOT / "scripts" / "install-node-red.sh"
RED_JS = ROOT / ".node-red" / "node_modules" / "node-red" / "red.js"
FLOW_BASE = "edge/edge-01"  # the topic base the shipped flow uses (README defaults)
TASK = "nodered"  # the task name the flow's inject nodes send
STATE_PATH = "/edge-agent-test/state"
FLOW_EVENTS = {"started", "stopped", "uploaded", "failed", "completed"}  # README "Events"

SETTINGS_JS = """\
module.exports = {
    uiHost: "127.0.0.1",
    flowFile: "flows.json",
    credentialSecret: false,
    disableEditor: true,
    httpAdminRoot: "/",
    httpNodeRoot: "/",
    diagnostics: { enabled: false, ui: false },
    telemetry: { enabled: false, updateNotification: false },
    runtimeState: { enabled: false, ui: false },
    externalModules: { autoInstall: false, palette: { allowInstall: false }, modules: { allowInstall: false } },
    functionExternalModules: false,
    logging: { console: { level: "info", metrics: false, audit: false } },
};
"""


class NodeRed(ManagedProcess):
    """Node-RED headless on a free port of 127.0.0.1: own userDir, no admin auth, no editor UI."""

    name = "node-red"
    start_timeout = 60.0
    stop_timeout = 10.0

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.user_dir = self.workdir / "userdir"
        self.settings_path = self.user_dir / "settings.js"

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def prepare(self) -> None:
        self.user_dir.mkdir(parents=True, exist_ok=True)
        self.settings_path.write_text(SETTINGS_JS)

    def command(self) -> list[str]:
        node = shutil.which("node") or "node"
        return [node, str(RED_JS), "--settings", str(self.settings_path), "--userDir", str(self.user_dir),
                "--port", str(self.port)]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NODE_RED_ENABLE_PROJECTS"] = "false"
        env["NO_UPDATE_NOTIFIER"] = "1"
        return env

    def is_ready(self) -> bool:
        try:
            return self.http("GET", "/flows", timeout=1)[0] == 200
        except OSError:
            return False

    def http(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout: float = 5.0) -> tuple[int, bytes]:  # fmt: skip
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def deploy(self, flow: list[dict[str, Any]]) -> None:
        code, text = self.http("POST", "/flows", flow, {"Node-RED-Deployment-Type": "full"}, timeout=15)
        if code not in (200, 204):
            raise PartError(f"POST /flows answered {code}: {text[:500]!r}\n{self.log_excerpt()}")

    def inject(self, node_id: str) -> None:
        code, text = self.http("POST", f"/inject/{node_id}", timeout=5)
        if code != 200:
            raise PartError(f"POST /inject/{node_id} answered {code}: {text[:200]!r}\n{self.log_excerpt()}")

    def state(self) -> dict[str, Any] | None:
        """The test endpoint's view of the flow context, or None while it is not deployed yet."""
        try:
            code, text = self.http("GET", STATE_PATH, timeout=3)
        except OSError:
            return None
        if code != 200:
            return None
        state: dict[str, Any] = json.loads(text)
        return state

    def wait_state(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def check() -> bool:
            state = self.state()
            if state is not None and predicate(state):
                found.update(state)
                return True
            return False

        try:
            self.wait_until(check, timeout, what)
        except PartError as exc:
            raise AssertionError(f"{exc}\nlast state: {self.state()}") from None
        return found


def install_node_red() -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("Node.js/npm not installed: Node-RED cannot be installed")
    try:
        done = subprocess.run(["bash", str(INSTALLER)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{INSTALLER.name} did not finish within 240 s: {exc.stderr!r}")
    assert done.returncode == 0, f"{INSTALLER.name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert RED_JS.is_file()


def flow_for_rig(rig_base: str, broker_port: int) -> list[dict[str, Any]]:
    """The shipped flow pointed at the test broker and topics, plus the test-only state endpoint."""
    flow: list[dict[str, Any]] = copy.deepcopy(json.loads(FLOW_FILE.read_text()))
    for node in flow:
        if node["type"] == "mqtt-broker":
            node["broker"], node["port"] = LOCALHOST, str(broker_port)
        if node.get("topic", "").startswith(FLOW_BASE + "/"):
            node["topic"] = rig_base + node["topic"][len(FLOW_BASE) :]
    events_in = next(n for n in flow if n["id"] == "ea_events_in")
    events_in["wires"][0].append("test_collect")
    tab = events_in["z"]
    collect = """\
const events = flow.get("testEvents") || [];
events.push(msg.payload);
flow.set("testEvents", events);
return null;"""
    respond = """\
msg.payload = {
    status: flow.get("cam1Status") || null,
    lastRecording: flow.get("lastRecording") || null,
    events: flow.get("testEvents") || [],
};
return msg;"""
    function = {"type": "function", "z": tab, "outputs": 1, "timeout": 0, "noerr": 0, "initialize": "",
                "finalize": "", "libs": []}  # fmt: skip
    flow += [
        {**function, "id": "test_collect", "name": "collect events (test)", "func": collect, "x": 340, "y": 380,
         "wires": [[]]},
        {"id": "test_http_in", "type": "http in", "z": tab, "name": "", "url": STATE_PATH, "method": "get",
         "upload": False, "swaggerDoc": "", "x": 150, "y": 440, "wires": [["test_state"]]},
        {**function, "id": "test_state", "name": "state (test)", "func": respond, "x": 360, "y": 440,
         "wires": [["test_http_out"]]},
        {"id": "test_http_out", "type": "http response", "z": tab, "name": "", "statusCode": "200",
         "headers": {"content-type": "application/json"}, "x": 540, "y": 440, "wires": []},
    ]  # fmt: skip
    return flow


def test_shipped_flow_shape() -> None:
    """The file is an importable flow with the nodes and topics the README documents (no Node-RED needed)."""
    flow = json.loads(FLOW_FILE.read_text())
    by_id = {n["id"]: n for n in flow}
    assert len(by_id) == len(flow)
    tabs = [n for n in flow if n["type"] == "tab"]
    assert [t["label"] for t in tabs] == ["edge-agent"]
    broker = next(n for n in flow if n["type"] == "mqtt-broker")
    assert (broker["broker"], str(broker["port"])) == ("127.0.0.1", "1883")
    for node in flow:
        if node["type"] not in ("tab", "mqtt-broker"):
            assert node["z"] == tabs[0]["id"], node["id"]
            assert all(target in by_id for wire in node["wires"] for target in wire), node["id"]
        if node["type"] in ("mqtt in", "mqtt out"):
            assert node["broker"] == broker["id"]
    start, stop, out = by_id["ea_inject_start"], by_id["ea_inject_stop"], by_id["ea_cmd_out"]
    assert (start["name"], stop["name"]) == ("start cam1", "stop cam1")
    assert json.loads(start["payload"]) == {"action": "start", "task_name": TASK} and start["payloadType"] == "json"
    assert json.loads(stop["payload"]) == {"action": "stop", "task_name": TASK} and stop["payloadType"] == "json"
    assert start["wires"] == stop["wires"] == [["ea_cmd_out"]]
    assert (out["type"], out["topic"], out["qos"]) == ("mqtt out", f"{FLOW_BASE}/cam1/cmd", "1")
    status_in, events_in = by_id["ea_status_in"], by_id["ea_events_in"]
    assert (status_in["topic"], status_in["datatype"]) == (f"{FLOW_BASE}/cam1/status", "json")
    assert {by_id[t]["type"] for t in status_in["wires"][0]} == {"debug", "function"}
    assert (events_in["topic"], events_in["datatype"]) == (f"{FLOW_BASE}/cam1/events", "json")
    switch = by_id[events_in["wires"][0][0]]
    assert switch["type"] == "switch" and switch["property"] == "payload.event"
    assert [r["v"] for r in switch["rules"]] == ["uploaded", "completed"]
    assert switch["wires"] == [["ea_ready_fn"], ["ea_ready_fn"]]
    assert by_id["ea_ready_fn"]["name"] == "on recording ready"
    assert by_id[by_id["ea_ready_fn"]["wires"][0][0]]["type"] == "debug"


@pytest.mark.integration
def test_node_red_flow_starts_and_stops_a_recording(
    tmp_path: Path, broker, probe, prefix, make_agent, camera, track
) -> None:
    install_node_red()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    probe.wait_for(rig.status_topic("cam1"), lambda p: p["status"] == "idle", timeout=20)

    red = track(NodeRed(tmp_path / "node-red")).start()
    red.deploy(flow_for_rig(rig.base, broker.port))
    # The retained idle status reaching the flow proves its broker connection (shared by the mqtt out).
    state = red.wait_state(lambda s: (s["status"] or {}).get("status") == "idle", 30, "see the retained idle status")
    assert state["events"] == [] and state["lastRecording"] is None

    red.inject("ea_inject_start")
    reply = probe.wait_for(rig.reply_topic("cam1"), lambda p: p.get("task_name") == TASK, timeout=20)
    assert reply["ok"] is True and reply["status"] in ("starting", "recording"), reply
    probe.wait_for(rig.status_topic("cam1"), lambda p: p["status"] == "recording" and p["task_name"] == TASK, 30)
    red.wait_state(lambda s: (s["status"] or {}).get("status") == "recording", 10, "see status recording")
    record_for(3)

    red.inject("ea_inject_stop")
    final = rig.wait_status("cam1", TASK, {"completed", "failed"}, timeout=60)
    assert final["status"] == "completed", final
    path = Path(final["local_file"])
    info = ffprobe_info(path)
    assert info["codec"] == "h264" and 1.5 <= info["duration"] <= 10.0, info
    assert moov_before_mdat(path)

    # Node-RED itself received the completed event, through switch -> "on recording ready".
    state = red.wait_state(lambda s: (s["lastRecording"] or {}).get("event") == "completed", 15,
                           "receive the completed event")  # fmt: skip
    ready = state["lastRecording"]
    assert ready["task_name"] == TASK and ready["camera_id"] == "cam1" and ready["device_id"] == rig.device
    assert ready["local_file"] == str(path) and ready["size_bytes"] == path.stat().st_size
    assert ready["sha256"] == final["sha256"]
    # Node-RED saw the task's flow events in order (other event kinds, if any, are not the flow's business).
    flow_events = [e["event"] for e in state["events"] if e["task_name"] == TASK and e["event"] in FLOW_EVENTS]
    assert flow_events == ["started", "stopped", "completed"], state["events"]
    state = red.wait_state(lambda s: (s["status"] or {}).get("status") == "completed", 10, "see status completed")
    assert state["status"]["task_name"] == TASK
    assert "Started flows" in red.log_text(), red.log_excerpt()
