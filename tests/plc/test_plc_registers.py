"""The register map as data, its documentation, the config section, and the
handshake state machine driven directly with a controlled clock."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from edge.types import Verdict, VerdictCode
from plc.config import PlcConfig
from plc.handshake import ILLEGAL_ADDRESS, ILLEGAL_VALUE, Handshake, RecipeResult
from plc.registers import (
    BLOCKS,
    MAP_SIZE,
    CommandResult,
    ControlBit,
    ControlBlock,
    ResultBlock,
    ResultError,
    StatusBit,
    StatusBlock,
    decode,
    encode,
    fields_of,
    join_u32,
    parse_version,
    render_markdown,
    scale_score,
    split_u32,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "plc.md"


def test_docs_publish_the_generated_register_map() -> None:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("<!-- BEGIN REGISTER MAP")
    start = text.index("\n", start) + 1
    end = text.index("<!-- END REGISTER MAP -->")
    assert text[start:end].strip() == render_markdown().strip(), (
        "docs/plc.md is out of date: regenerate with `python -m plc.registers`"
    )


def test_blocks_do_not_overlap_and_every_field_is_documented() -> None:
    used: set[int] = set()
    for block in BLOCKS:
        for name, reg in fields_of(block):
            assert reg.doc, name
            words = set(range(block.START + reg.offset, block.START + reg.offset + reg.words))
            assert words.isdisjoint(used), name
            assert reg.offset + reg.words <= block.SIZE, name
            used |= words
    assert max(used) == MAP_SIZE - 1
    for flags in (ControlBit, StatusBit):
        for member in flags:
            assert member.name
            assert member.name in render_markdown()


def test_u32_word_order() -> None:
    assert split_u32(0x12345678, "high_first") == (0x1234, 0x5678)
    assert split_u32(0x12345678, "low_first") == (0x5678, 0x1234)
    assert join_u32(0x5678, 0x1234, "low_first") == 0x12345678


@given(
    part=st.integers(0, 2**32 - 1),
    recipe=st.integers(0, 65535),
    order=st.sampled_from(["high_first", "low_first"]),
)
def test_encode_decode_round_trip(part: int, recipe: int, order: str) -> None:
    block = ControlBlock(control=1, part_id=part, recipe_id=recipe)
    words = encode(block, order)  # type: ignore[arg-type]
    assert len(words) == ControlBlock.SIZE
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode(ControlBlock, words, order) == block  # type: ignore[arg-type]


def test_decode_too_short_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs 17 words"):
        decode(ResultBlock, [0] * 3, "high_first")


def test_scaling_and_versions() -> None:
    assert scale_score(0.1234, 1000) == 123
    assert scale_score(math.nan, 1000) == 0xFFFF
    assert scale_score(None, 1000) == 0xFFFF
    assert scale_score(1e9, 1000) == 0xFFFE
    assert scale_score(-1.0, 1000) == 0
    assert scale_score(math.inf, 1000) == 0xFFFE
    assert parse_version("1.4.2") == (1, 4, 2)
    assert parse_version("v2.10.0-rc1") == (2, 10, 0)
    assert parse_version("") == (0, 0, 0)
    assert parse_version("abc") == (0, 0, 0)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="not an IP address"):
        PlcConfig(allowed_clients=["plc.local"])
    with pytest.raises(ValidationError, match="must fit below 65536"):
        PlcConfig(base_address=65500)
    with pytest.raises(ValidationError, match="unique"):
        PlcConfig(defect_classes=["scratch", "scratch"])
    with pytest.raises(ValidationError):
        PlcConfig.model_validate({"mode": "master"})
    with pytest.raises(ValidationError):
        PlcConfig.model_validate({"prot": 502})  # typo: extra keys are errors
    cfg = PlcConfig()
    assert (cfg.host, cfg.port, cfg.mode, cfg.result_buffer_depth) == (
        "127.0.0.1",
        5020,
        "server",
        8,
    )


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _core(**kw: object) -> tuple[Handshake, Clock]:
    clock = Clock()
    core = Handshake(PlcConfig.model_validate(kw), recipes_supported=True, clock=clock)
    core.start()
    core.heartbeat_ok()
    return core, clock


def _status(core: Handshake) -> StatusBlock:
    words = core.read(StatusBlock.START, StatusBlock.SIZE)
    assert isinstance(words, list)
    return decode(StatusBlock, words, "high_first")


def _verdict(part: int, captured: float, code: VerdictCode = VerdictCode.OK) -> Verdict:
    return Verdict(
        inspection_id=part,
        frame_sequence=part,
        source_id="t",
        trigger_id=part,
        code=code,
        score=0.1,
        threshold=0.5,
        capture_time=captured,
    )


def test_heartbeat_advances_only_while_healthy_and_wraps() -> None:
    core, clock = _core(heartbeat_period_ms=100, heartbeat_timeout_ms=300)
    core._heartbeat = 0xFFFF  # the wrap is what a PLC watchdog must cope with
    for _ in range(3):
        clock.t += 0.1
        core.heartbeat_ok()
        core.tick()
    assert _status(core).heartbeat == 2
    for _ in range(5):  # no heartbeat_ok: frozen after the timeout
        clock.t += 0.1
        core.tick()
    st = _status(core)
    assert st.heartbeat in (2, 3, 4, 5)
    assert st.status & StatusBit.FAULT
    frozen = st.heartbeat
    clock.t += 1.0
    core.tick()
    assert _status(core).heartbeat == frozen


def test_stale_frame_is_never_reported_for_a_reused_part_id() -> None:
    core, clock = _core(verdict_deadline_ms=100)
    core.write(0, [int(ControlBit.TRIGGER), 0, 9], "plc")
    core.write(0, [0], "plc")
    clock.t += 0.2
    core.tick()  # deadline: ERROR for part 9
    core.write(0, [int(ControlBit.RESULT_ACK)], "plc")
    core.write(0, [0], "plc")
    clock.t += 0.01
    t_second = clock.t
    core.write(0, [int(ControlBit.TRIGGER), 0, 9], "plc")  # the PLC reuses id 9
    # the late verdict of the first part 9 (frame captured before the 2nd trigger)
    fx = core.add_verdict(_verdict(9, captured=t_second - 0.15))
    assert [e.kind for e in fx.events] == ["late_verdict"]
    assert not _status(core).status & StatusBit.RESULT_VALID
    core.add_verdict(_verdict(9, captured=t_second + 0.001))
    words = core.read(ResultBlock.START, ResultBlock.SIZE)
    assert isinstance(words, list)
    assert decode(ResultBlock, words, "high_first").verdict == VerdictCode.OK


def test_write_validation_codes() -> None:
    core, _ = _core(recipe_id_max=10)
    assert core.write(4, [0], "plc")[0] == ILLEGAL_ADDRESS
    assert core.write(-1, [0], "plc")[0] == ILLEGAL_ADDRESS
    assert core.write(0, [0x8000], "plc")[0] == ILLEGAL_VALUE
    assert core.write(3, [11], "plc")[0] == ILLEGAL_VALUE
    assert core.write(3, [10], "plc")[0] is None
    assert core.read(0, MAP_SIZE + 1) == ILLEGAL_ADDRESS
    assert core.counters.illegal_writes == 4


def test_recipe_rejected_while_executing() -> None:
    core, _ = _core()
    core.write(3, [5], "plc")
    fx = core.write(0, [int(ControlBit.RECIPE_EXECUTE)], "plc")[1]
    assert fx.recipe == 5  # nothing in flight: runs at once
    core.write(0, [0], "plc")
    fx = core.write(0, [int(ControlBit.RECIPE_EXECUTE)], "plc")[1]
    assert fx.recipe is None
    assert fx.events[0].data["state"] == "rejected"
    assert _status(core).status & StatusBit.CMD_BUSY
    core.recipe_finished(5, RecipeResult(False, CommandResult.LOAD_FAILED, "bad package"))
    st = _status(core)
    assert st.status & StatusBit.CMD_FAILED
    assert st.command_result == CommandResult.LOAD_FAILED
    assert st.active_recipe_id == 0
    # FAULT_RESET clears the latched command flags
    core.write(0, [int(ControlBit.FAULT_RESET)], "plc")
    assert not _status(core).status & StatusBit.CMD_FAILED


def test_recipe_timeout_fails_the_change_and_a_late_answer_tells_the_truth() -> None:
    core, clock = _core(recipe_timeout_ms=500)
    core.write(3, [5], "plc")
    fx = core.write(0, [int(ControlBit.RECIPE_EXECUTE)], "plc")[1]
    assert fx.recipe == 5
    assert core.next_wakeup() <= clock.t + 0.5
    clock.t += 0.499
    core.tick()
    assert _status(core).status & StatusBit.CMD_BUSY  # not yet
    clock.t += 0.002
    fx = core.tick()
    st = _status(core)
    assert st.status & StatusBit.CMD_FAILED
    assert not st.status & (StatusBit.CMD_BUSY | StatusBit.CMD_DONE)
    assert st.status & StatusBit.READY  # the station takes parts again
    assert st.command_result == CommandResult.TIMEOUT
    assert st.active_recipe_id == 0
    assert [(e.kind, e.data["state"], e.data["reason"]) for e in fx.events] == [
        ("recipe", "failed", int(CommandResult.TIMEOUT))
    ]
    # while the timed-out handler still runs, a new change is refused visibly
    core.write(3, [6], "plc")
    core.write(0, [0], "plc")
    fx = core.write(0, [int(ControlBit.RECIPE_EXECUTE)], "plc")[1]
    assert fx.recipe is None
    st = _status(core)
    assert st.status & StatusBit.CMD_FAILED
    assert st.command_result == CommandResult.REJECTED_BUSY
    # the stuck handler fails late: nothing changes but an event
    fx = core.recipe_finished(5, RecipeResult(False, CommandResult.LOAD_FAILED, "bad"))
    assert [e.data["state"] for e in fx.events] == ["late_failed"]
    assert _status(core).active_recipe_id == 0
    # a handler that times out and then succeeds: ACTIVE_RECIPE_ID follows the truth
    core.write(0, [0], "plc")
    assert core.write(0, [int(ControlBit.RECIPE_EXECUTE)], "plc")[1].recipe == 6
    clock.t += 0.6
    core.tick()
    assert _status(core).command_result == CommandResult.TIMEOUT
    fx = core.recipe_finished(6, RecipeResult(True))
    assert [e.data["state"] for e in fx.events] == ["late_completed"]
    st = _status(core)
    assert st.active_recipe_id == 6
    assert st.command_result == CommandResult.TIMEOUT  # what the PLC was told stays


def test_error_verdict_from_the_pipeline_is_reported_as_error() -> None:
    core, clock = _core()
    core.write(0, [int(ControlBit.TRIGGER), 0, 1], "plc")
    core.add_verdict(_verdict(1, clock.t, VerdictCode.ERROR))
    words = core.read(ResultBlock.START, ResultBlock.SIZE)
    assert isinstance(words, list)
    res = decode(ResultBlock, words, "high_first")
    assert res.verdict == VerdictCode.ERROR
    assert res.error_code == ResultError.PIPELINE


ops = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "trigger",
                "untrigger",
                "ack",
                "unack",
                "verdict",
                "stray",
                "time",
                "fault",
                "heal",
                "beat",
            ]
        ),
        st.integers(1, 6),
        st.integers(0, 400),
    ),
    max_size=80,
)


@given(ops)
def test_every_trigger_gets_exactly_one_result_for_its_part(
    steps: list[tuple[str, int, int]],
) -> None:
    """Random PLC / pipeline interleavings: one result per trigger edge, never a wrong id,
    OK only from an OK verdict given after that part's trigger."""
    core, clock = _core(
        verdict_deadline_ms=150,
        result_buffer_depth=3,
        max_parts_in_flight=2,
        heartbeat_timeout_ms=300,
    )
    ctrl = 0
    ok_given: dict[int, float] = {}  # part -> time an OK verdict was accepted for it
    triggered_at: dict[int, float] = {}
    seen_results: list[tuple[int, int]] = []
    for op, pid, ms in steps:
        if op == "trigger" and not ctrl & ControlBit.TRIGGER:
            ctrl |= ControlBit.TRIGGER
            core.write(0, [ctrl, 0, pid], "plc")
            triggered_at.setdefault(pid, clock.t)
        elif op == "untrigger":
            ctrl &= ~ControlBit.TRIGGER
            core.write(0, [ctrl], "plc")
        elif op == "ack" and not ctrl & ControlBit.RESULT_ACK:
            words = core.read(StatusBlock.START, StatusBlock.SIZE + ResultBlock.SIZE)
            assert isinstance(words, list)
            status = decode(StatusBlock, words, "high_first")
            if status.status & StatusBit.RESULT_VALID:
                res = decode(
                    ResultBlock, words[ResultBlock.START - StatusBlock.START :], "high_first"
                )
                assert res.part_id in triggered_at, res
                if res.verdict == VerdictCode.OK:
                    assert res.part_id in ok_given, res
                seen_results.append((res.part_id, res.verdict))
            ctrl |= ControlBit.RESULT_ACK
            core.write(0, [ctrl], "plc")
        elif op == "unack":
            ctrl &= ~ControlBit.RESULT_ACK
            core.write(0, [ctrl], "plc")
        elif op in ("verdict", "stray"):
            part = pid if op == "verdict" else pid + 100
            before = core.counters.results
            core.add_verdict(_verdict(part, clock.t))
            if core.counters.results > before:
                ok_given[part] = clock.t
        elif op == "time":
            clock.t += ms / 1000
            core.tick()
        elif op == "fault":
            core.set_health(ready=False, fault_code=2, message="backend")
        elif op == "heal":
            core.set_health(ready=True, fault_code=0, message="")
        else:
            core.heartbeat_ok()
    c = core.counters
    assert c.triggers == c.results + c.overruns + core.status()["in_flight"]
    assert c.results == c.ok + c.ng + c.error
    assert all(pid < 100 for pid, _ in seen_results)
