"""Progress of the operators' runs: the label (steps done of the total, time left) and, for immediate runs in the
App, its streaming (FiftyOne shows ``ctx.set_progress`` only for scheduled runs)."""

import functools
import json
import logging

import fiftyone as fo
from fiftyone.operators.message import GeneratedMessage, MessageType

import fairbalance


def progress_callback(ctx, label):
    """A FiftyOne ``progress`` callable that forwards to ``ctx.set_progress``: steps done of the total and the
    time left ("Training steps: 120 of 900 (13%), about 2 min left"), shown by FiftyOne for scheduled runs."""

    def report(pb):
        left = pb.time_remaining
        if left is None and pb.total and pb.iteration and pb.elapsed_time:  # a quiet bar (no terminal) has none
            left = pb.elapsed_time * (pb.total - pb.iteration) / pb.iteration
        ctx.set_progress(progress=pb.progress, label=progress_label(label, pb.iteration, pb.total, left))

    return fo.report_progress(report, dt=0.5)


def streams_progress(execute):
    """Decorator of a heavy operator's ``execute`` (with ``operator_config(..., streams=True)``): the steps and time
    left of an immediate run in the App, as scheduled runs show them.

    FiftyOne shows ``ctx.set_progress`` only for delegated runs; for an
    immediate one it would go to the browser console. The App shows progress
    while an operator runs only when the operator is a generator yielding
    ``set_progress``: FiftyOne draws it in a dialog of its own (closed by its
    Done button). So, for a run started from the App, the work runs in a
    thread; once it has lasted a second, every ``ctx.set_progress`` (the
    ``progress=`` callback of :func:`progress_callback`, already throttled)
    is drawn there with its label ("Training: 120 of 900 (13%), about 2 min
    left"), and at the end that dialog shows the result (the "Executing..."
    one closes). A quicker run shows its result in the usual dialog. A
    failure is an error in words (its traceback only in the App's log).
    Scheduled runs and SDK calls (``execute_operator``) run and return as
    before.
    """

    @functools.wraps(execute)
    def wrapper(self, ctx):
        if ctx.delegated or "operator_uri" not in ctx.request_params:  # only the App's requests name the operator
            return execute(self, ctx)
        return _stream(self, ctx, lambda: execute(self, ctx))

    wrapper.streams_progress = True
    return wrapper


#: Seconds a run goes before its progress is drawn (a quicker one only shows its result).
PROGRESS_AFTER = 1.0


def _stream(operator, ctx, work):
    """Run ``work`` in a thread; yield its progress as the App's ``set_progress``, then its result (or error)."""
    import queue
    import threading
    import time

    from fiftyone.core.utils import Encoder
    from fiftyone.operators.executor import ExecutionResult, InvocationRequest

    def message(name, params):
        return GeneratedMessage(MessageType.SUCCESS, cls=InvocationRequest, body=InvocationRequest(name, params))

    events, done, outcome, start = queue.Queue(), object(), {}, time.time()
    ctx.set_progress = lambda progress=None, label=None: events.put((progress, label))  # this run's only

    def run():
        try:
            outcome["result"] = json.loads(json.dumps(work(), cls=Encoder))
        except Exception as e:  # noqa: BLE001  (shown in words; the traceback goes to the App's log)
            logging.getLogger(__name__).exception("%s failed", ctx.operator_uri)
            outcome["error"] = str(e) if isinstance(e, fairbalance.FairBalanceError) else f"{type(e).__name__}: {e}"
        finally:
            events.put(done)

    started, shown = len(ctx.executor._requests), None
    threading.Thread(target=run, name=f"fairbalance {ctx.operator_uri}", daemon=True).start()
    event = events.get()
    while event is not done:
        while not events.empty() and event is not done:  # only the latest state: the App redraws, never queues
            event = events.get()
        if event is done:
            break
        if time.time() - start >= PROGRESS_AFTER:
            shown = {"label": event[1], **({"progress": event[0]} if event[0] is not None else {})}
            yield message("set_progress", shown)
        event = events.get()
    for request in ctx.executor._requests[started:]:  # what the work triggered (e.g. refresh_app), after it
        yield GeneratedMessage(MessageType.SUCCESS, cls=InvocationRequest, body=request)
    if "error" in outcome:
        if shown:
            yield message("set_progress", {**shown, "label": f"Failed: {outcome['error']}"})
        yield _Line({"error": outcome["error"], "error_message": outcome["error"]})
        return
    outputs = None
    if shown:  # the progress dialog shows the result; the "Executing..." one, given no result, closes
        ctx.request_params["results"] = outcome["result"]
        outputs = operator.resolve_output(ctx)
    if outputs is not None:
        outputs, results = _titled(outputs, outcome["result"])
        yield message("show_output", {"outputs": outputs.to_json(), "results": results})
    else:  # the App takes an ExecutionResult message's body as the result of the usual dialog
        yield GeneratedMessage(MessageType.SUCCESS, cls=ExecutionResult, body=_Line(outcome["result"]))


def _titled(outputs, results):
    """The result view with its title as its first line: FiftyOne's progress dialog shows no view label."""
    import fiftyone.operators.types as types

    title = getattr(getattr(outputs, "view", None), "label", None)
    if not title or not isinstance(results, dict):
        return outputs, results
    head = types.Object()
    head.str("result_title", view=types.MarkdownView())
    head.properties.update(outputs.type.properties)
    return types.Property(head, view=outputs.view), {"result_title": f"**{title}**", **results}


class _Line(GeneratedMessage):
    """A message body, or a whole line of the App's generator stream, as given (the App reads ``error`` there)."""

    def __init__(self, data):
        super().__init__(body=None)
        self.data = data

    def to_json(self):
        return self.data

    def to_json_line(self):
        return json.dumps(self.data) + "\n"


def progress_label(label, done, total, seconds_left=None):
    """``"<label>: <done> of <total> (<pct>), about <t> left"``; the time once a step gives a rate."""
    if not total:
        return f"{label}: {done}"
    text = f"{label}: {done:,} of {total:,} ({done / total:.0%})"
    if seconds_left is not None and done and done < total:
        s = max(1, int(round(seconds_left)))
        text += ", about " + (f"{s} s" if s < 90 else f"{round(s / 60)} min" if s < 5400 else
                              f"{s / 3600:.1f} h") + " left"
    return text
