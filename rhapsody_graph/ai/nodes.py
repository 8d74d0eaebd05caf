"""``ai`` and ``@prompt``: AI nodes, filled with upstream *values* at run time.

An AI node's arguments are its inputs (nodes or plain values). When it runs, the
prompt is built from their values: a template filled with ``str.format(*values)``,
a list of templates (one node, a list of answers), or the return value of a
``@prompt`` function. It is sent as a chat message (default, with ``system=``) or a
plain completion, with the node's own sampling (``temperature``, ``max_tokens``,
``top_p``, ``stop``, ``seed``); its value is the text, or ``parse(text)``.

>>> n = ai("Capital of {}? One word.", "France", model="smollm2", max_tokens=8)
>>> n.kind, n.name
('ai', 'ai')
"""
from __future__ import annotations

import functools
import inspect
import math
import string
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import brief
from ..graph import Node
from ..task import Options, validate

__all__ = ["ai", "prompt", "AISpec", "AI", "build", "run"]

AI = "ai"
SAMPLING = ("temperature", "max_tokens", "top_p", "top_k", "stop", "seed")


def _number(least: float, most: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and least <= v <= most and v < math.inf)


def _integer(least: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


# each sampling keyword's test and what it must be (a value the server would refuse, or
# that JSON cannot carry, is refused where the node is declared)
_SAMPLED: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "temperature": (_number(0.0), "a finite number >= 0"),
    "top_p": (_number(0.0, 1.0), "a number from 0 to 1"),
    "max_tokens": (_integer(-1), "an integer >= -1 (0 or -1: no limit, on llama.cpp)"),
    "top_k": (_integer(-1), "an integer >= -1 (-1: every token, on vLLM)"),
    "seed": (_integer(-2**63), "an integer"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(
        isinstance(s, str) for s in v)), "a string or a list of strings"),
}
assert set(_SAMPLED) == set(SAMPLING)


class AISpec:
    """What an AI node asks: the model, how to build its prompts, and how to sample."""

    __slots__ = ("model", "template", "builder", "system", "chat", "sampling", "parse")

    def __init__(self, model: str, template: Union[str, Sequence[str], None],
                 builder: Optional[Callable[..., Any]], system: Optional[str], chat: bool,
                 sampling: Dict[str, Any], parse: Optional[Callable[[str], Any]]) -> None:
        self.model, self.template, self.builder = model, template, builder
        self.system, self.chat, self.sampling, self.parse = system, chat, sampling, parse

    def prompts(self, values: Sequence[Any]) -> Union[str, List[str]]:
        """The prompt text (or list of texts) for these input values."""
        if self.builder is not None:
            return self.builder(*values)
        if isinstance(self.template, str):
            return self.template.format(*values)
        return [t.format(*values) for t in self.template]


def _options(who: str, options: Dict[str, Any]) -> Options:
    values = validate(who, {"cpus": 0, **options})
    return Options(values, "ai", f"ai:{who}")


def _spec(who: str, model: str, template: Any, builder: Any, system: Optional[str],
          chat: Optional[bool], parse: Any, sampling: Dict[str, Any]) -> AISpec:
    if not isinstance(model, str) or not model:
        raise TypeError(f"{who}: model= must name a declared model, got {brief(model)}")
    unknown = set(sampling) - set(SAMPLING)
    if unknown:
        raise TypeError(f"{who}: unknown sampling option(s) {sorted(unknown)}; "
                        f"valid: {', '.join(SAMPLING)}")
    for key, value in sampling.items():
        if value is not None and not _SAMPLED[key][0](value):
            raise ValueError(f"{who}: {key}= must be {_SAMPLED[key][1]}, got {brief(value)}")
    if parse is not None and not callable(parse):
        raise TypeError(f"{who}: parse= must be callable, got {brief(parse)}")
    if chat is not None and not isinstance(chat, bool):
        raise TypeError(f"{who}: chat= must be True or False, got {brief(chat)}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"{who}: system= must be a string, got {brief(system)}")
    if system is not None and chat is False:
        raise ValueError(f"{who}: system= needs a chat request (chat=True)")
    return AISpec(model, template, builder, system, True if chat is None else chat,
                  {k: v for k, v in sampling.items() if v is not None}, parse)


def _check_template(who: str, template: str, inputs: int) -> None:
    """Refuse, where the node is built, a template ``str.format(*values)`` cannot fill
    from ``inputs`` values: a named placeholder, one past the last input (fields nested
    in a format spec included), or ``{}`` and ``{0}`` mixed."""
    auto, numbered = 0, False
    try:
        fields = list(_fields(template))
    except ValueError as e:  # "Single '}' encountered in format string"
        braces = " (write {{ and }} for literal braces)" if "'{'" in str(e) or "'}'" in str(e) \
            else ""
        raise ValueError(f"{who}: template {template!r} is not a format string: {e}"
                         f"{braces}") from None
    for field in fields:
        head = field.split(".", 1)[0].split("[", 1)[0]
        if not head:
            index, auto = auto, auto + 1
        elif head.isdigit():
            index, numbered = int(head), True
        else:
            raise ValueError(f"{who}: template {template!r} names {{{head}}}, but a template "
                             f"is filled by position from the node's inputs ({inputs} "
                             "given): write {} or {0}, or build the text with @prompt")
        if index >= inputs:
            raise ValueError(f"{who}: template {template!r} has a placeholder for input "
                             f"{index}, but {inputs} input(s) were given")
        if auto and numbered:
            raise ValueError(f"{who}: template {template!r} mixes {{}} and numbered "
                             "placeholders ({0}); use one kind")


def _fields(template: str) -> Iterator[str]:
    """The replacement fields of ``template``, those nested in a format spec too."""
    for _, field, spec, conversion in string.Formatter().parse(template):
        if conversion not in (None, "r", "s", "a"):  # str.format knows these only
            raise ValueError(f"unknown conversion !{conversion} (use !r, !s or !a)")
        if field is not None:
            yield field
            if spec and "{" in spec:
                yield from _fields(spec)


def ai(prompt: Union[str, Sequence[str]], *inputs: Any, model: str,
       system: Optional[str] = None, chat: Optional[bool] = None,
       parse: Optional[Callable[[str], Any]] = None, name: Optional[str] = None,
       timeout: Optional[float] = None, retries: int = 0, backend: Optional[str] = None,
       **sampling: Any) -> Node:
    """A node that prompts ``model`` with ``prompt`` filled by the values of ``inputs``.

    ``prompt`` is a template (``"Summarise: {}"``) or a list of them (the value is then
    a list of answers). Sampling keywords: ``temperature``, ``max_tokens``, ``top_p``,
    ``stop``, ``seed``.
    """
    who = f"ai node {name or 'ai'!r}"
    if not isinstance(prompt, str) and not (
            isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt)):
        raise TypeError(f"{who}: prompt must be a template string or a non-empty list of them, "
                        f"got {brief(prompt)}")
    templates = [prompt] if isinstance(prompt, str) else list(prompt)
    for template in templates:
        _check_template(who, template, len(inputs))
    spec = _spec(who, model, prompt if isinstance(prompt, str) else templates, None, system,
                 chat, parse, sampling)
    opts = _options(who, {"timeout": timeout, "retries": retries, "backend": backend,
                          **({"name": name} if name is not None else {})})
    return Node(spec, inputs, {}, opts, kind=AI)


def prompt(model: str, *, system: Optional[str] = None, chat: Optional[bool] = None,
           parse: Optional[Callable[[str], Any]] = None, timeout: Optional[float] = None,
           retries: int = 0, backend: Optional[str] = None,
           **sampling: Any) -> Callable[[Callable[..., Any]], Callable[..., Node]]:
    """Decorate a function that builds the prompt (a string or a list) from input values.

    >>> @prompt(model="smollm2", max_tokens=16)
    ... def plan(scores): return f"Given {scores}, which run next?"
    >>> plan([1, 2]).kind
    'ai'
    """
    if callable(model):  # a bare @prompt
        raise TypeError(f"@prompt needs the model to ask: @prompt(model=\"name\"), got "
                        f"@prompt on {brief(model)}")
    _spec("@prompt", model, None, None, system, chat, parse, sampling)  # refused here

    def decorate(fn: Callable[..., Any]) -> Callable[..., Node]:
        if not callable(fn):
            raise TypeError(f"@prompt(model={model!r}) decorates a function that builds the "
                            f"prompt, got {brief(fn)}")
        who = f"ai node {fn.__name__!r}"
        spec = _spec(who, model, None, fn, system, chat, parse, sampling)
        opts = _options(who, {"timeout": timeout, "retries": retries, "backend": backend,
                              "name": fn.__name__})

        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def make(*inputs: Any) -> Node:
            try:  # its inputs fit its parameters: refused here, not after upstream ran
                signature.bind(*inputs)
            except TypeError as e:
                raise TypeError(f"{who}: {e} (it takes the prompt's inputs "
                                f"{signature})") from None
            return Node(spec, inputs, {}, opts, kind=AI)
        make.makes_ai_nodes = True  # type: ignore[attr-defined]  # map() calls it as it is
        return make
    return decorate


def build(spec: AISpec, values: Sequence[Any]) -> Tuple[List[str], bool]:
    """The prompt texts for ``values`` and whether the node asked one (its answer is then
    one text, not a list). A builder that raises or returns no strings fails here, before
    any server is started or asked."""
    built = spec.prompts(values)
    texts = [built] if isinstance(built, str) else built
    if not isinstance(texts, (list, tuple)) or not texts or not all(
            isinstance(t, str) for t in texts):
        raise TypeError(f"the prompt must be a string or a non-empty list of strings, "
                        f"got {brief(built)}")
    return list(texts), isinstance(built, str)


def run(spec: AISpec, client: Any, takes_lists: bool, prompts: Tuple[List[str], bool],
        deadline: Any = None) -> Any:
    """Ask the server for ``prompts`` (from :func:`build`), giving up at ``deadline`` (a
    :class:`~rhapsody_graph.ai.client.Deadline`); return text(s) or parsed value(s)."""
    texts, single = prompts
    if spec.chat:
        system = [{"role": "system", "content": spec.system}] if spec.system else []
        answers = client.chat([system + [{"role": "user", "content": t}] for t in texts],
                              deadline, **spec.sampling)
    else:
        answers = client.complete(texts, takes_lists, deadline, **spec.sampling)
    if spec.parse is not None:
        answers = [spec.parse(a) for a in answers]
    return answers[0] if single else answers
