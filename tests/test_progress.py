import io
import json

from raytrain_spot.observe.events import EventFeed
from raytrain_spot.observe.progress import ProgressPrinter, WorkProgress


def step(t, n, world_size=2, loss=1.0):
    return {"t": t, "ev": "step", "step": n, "world_size": world_size, "samples": [(n - 1) * 8, n * 8],
            "loss": loss, "lr": 1e-3}


def test_printer_shows_only_this_invocation_every_n_steps_with_rate(tmp_path):
    earlier = [{"t": 10.0, "ev": "group", "world_size": 3, "step": 0, "restored_step": None, "nodes": ["a", "b", "c"]},
               step(11.0, 4)]
    now = [{"t": 100.0, "ev": "group", "world_size": 2, "step": 4, "restored_step": 4, "nodes": ["a", "b"]},
           *[step(100.0 + n, n) for n in range(5, 11)]]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in earlier + now))
    out = io.StringIO()
    printer = ProgressPrinter(total_steps=11, every_steps=3, out=out, since=50.0)
    with EventFeed(str(path), [printer], poll_s=0.05):
        pass

    lines = out.getvalue().splitlines()
    assert lines[0] == "[group] training with 2 workers from restored step 4"
    assert [line.split("|")[0].strip() for line in lines[1:]] == ["step      6/11", "step      9/11"]
    assert "8.0 samples/s" in lines[2]  # 24 samples in the 3 s between the printed steps
    assert printer.latest_step == 10 and printer.rank_nodes == ["a", "b"]


def test_step_lines_show_the_time_since_this_invocation_started_and_the_time_to_the_last_step():
    out = io.StringIO()
    printer = ProgressPrinter(total_steps=100, every_steps=10, out=out, since=1000.0)
    for n in range(1, 31):
        printer.write(step(1000.0 + 5.0 + 2.0 * n, n))  # 8 samples every 2 s after 5 s of start-up
    first, second, third = out.getvalue().splitlines()
    assert first.endswith("| elapsed 0:00:25 | eta --"), first  # no rate yet
    # 10 steps in 20 s: the 80 steps left take 160 s; 70 take 140 s
    assert second.endswith("| elapsed 0:00:45 | eta 0:02:40"), second
    assert third.endswith("| elapsed 0:01:05 | eta 0:02:20"), third


def test_work_before_training_prints_how_far_it_is_its_elapsed_time_and_the_time_left_at_its_rate():
    now = [100.0]
    lines = []
    with WorkProgress("checking the rows of /data", 1000, "rows", lines.append, clock=lambda: now[0]) as work:
        for done, at in ((100, 101.0), (200, 104.0), (300, 106.0), (900, 118.0), (1000, 120.0)):
            now[0] = at
            work.update(done)
    assert lines == ["checking the rows of /data: 300/1,000 rows (30%) | elapsed 0:00:06 | eta 0:00:14",
                     "checking the rows of /data: 900/1,000 rows (90%) | elapsed 0:00:18 | eta 0:00:02",
                     "checking the rows of /data: done, 1,000 rows in 0:00:20"]


def test_work_that_ends_before_its_first_line_prints_nothing():
    now = [0.0]
    lines = []
    with WorkProgress("fetching gs://b/m", 10.0, "MiB", lines.append, clock=lambda: now[0]) as work:
        now[0] = 4.9
        work.update(10.0)
    assert lines == []
