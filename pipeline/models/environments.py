"""Environments a policy acts in while it generates: user classes whose public methods are its tools.

TRL's GRPOTrainer takes them as `environment_factory`. An environment class defines
- `reset(**row)`: called with each rollout's dataset row before it is generated; a string it returns is appended to
  the prompt's last user turn (the task the environment set);
- public methods, the tools the model may call (described to it by signature and docstring, as `tools:` are);
- optionally `get_reward()`: the environment then scores each rollout once its conversation has ended (one reward
  term, weight 1, named after the class).
TRL makes one instance per rollout, so rollouts never share state, and reuses instances across batches (hence
`reset`). Each tool method is guarded like a tool (`pipeline.models.tools`): an error, a hang or a non-text answer
becomes an `error: ...` message for the model, counted in the stage's `ToolStats`.

`validate` inspects the class and never makes one (`environment_problems`): its constructor is user code too.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config.paths import callable_problems, import_object
from pipeline.models.tools import ToolStats, call_guarded, schema_problem

NOT_TOOLS = ("reset", "get_reward")  # TRL's hooks, never shown to the model


@dataclass(kw_only=True)
class EnvironmentSpec:
    """`environment: {factory: package.module:Class, args: {...}}`; a bare `package.module:Class` takes no args."""

    factory: str  # the class; one instance per rollout
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of every instance


def environment_spec(value: str | EnvironmentSpec | None) -> EnvironmentSpec | None:
    return EnvironmentSpec(factory=value) if isinstance(value, str) else value


def tool_methods(cls: type) -> list[str]:
    """The methods TRL shows the model as tools: public functions of the class, except its hooks."""
    return [name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if not name.startswith("_") and name not in NOT_TOOLS]


def owns_reward(value: str | EnvironmentSpec | None) -> bool:
    """Whether the environment scores its rollouts (`get_reward`), so a stage needs no other reward."""
    spec = environment_spec(value)
    if spec is None or callable_problems(spec.factory):
        return False
    cls = import_object(spec.factory)
    return isinstance(cls, type) and callable(getattr(cls, "get_reward", None))


def environment_problems(value: str | EnvironmentSpec | None) -> list[str]:
    """The class importable, with `reset`, at least one tool method, each describable to the model, and a
    constructor that takes `args`. Nothing is constructed or called."""
    spec = environment_spec(value)
    if spec is None:
        return []
    found = callable_problems(spec.factory)
    if found:
        return [f"environment: {p}" for p in found]
    cls = import_object(spec.factory)
    if not isinstance(cls, type):
        return [f"environment: '{spec.factory}' must be a class (its methods are the tools, read without making one)"]
    problems = []
    if not callable(getattr(cls, "reset", None)):
        problems.append(f"environment: '{spec.factory}' has no `reset` method (called with each rollout's row)")
    names = tool_methods(cls)
    if not names:
        problems.append(f"environment: '{spec.factory}' has no public method for the model to call")
    for name in names:  # described as TRL does, bound (to a stand-in: no instance is made), so `self` is no argument
        problem = schema_problem(types.MethodType(getattr(cls, name), object()), f"{spec.factory}.{name}")
        if problem:
            problems.append(f"environment: {problem}")
    try:
        inspect.signature(cls).bind(**spec.args)
    except TypeError as err:
        problems.append(f"environment.args: {err} (for '{spec.factory}')")
    return problems


def guarded_method(method: Callable[..., Any], timeout: float, stats: ToolStats) -> Callable[..., str]:
    """A tool method made safe to call (see `pipeline.models.tools`); keeps the signature TRL describes."""

    @functools.wraps(method)
    def call(self, *args: Any, **kwargs: Any) -> str:
        return call_guarded(method.__name__, functools.partial(method, self, *args, **kwargs), timeout, stats)

    return call


def environment_factory(value: str | EnvironmentSpec, timeout: float, stats: ToolStats) -> Callable[[], Any]:
    """What TRL's `environment_factory` takes: a callable making one environment, its tool methods guarded.

    The guarded class is a subclass of the user's, named as it is (TRL names the reward term after it), whose
    tool methods call the originals through `call_guarded`."""
    spec = environment_spec(value)
    cls = import_object(spec.factory)
    guarded_cls = type(cls.__name__, (cls,), {name: guarded_method(getattr(cls, name), timeout, stats)
                                              for name in tool_methods(cls)})
    return functools.partial(guarded_cls, **spec.args)


def episodes(prompts: list[Any], rows: list[dict[str, Any]], tools: list[Callable[..., str]],
             make_environment: Callable[[], Any] | None) -> tuple[list[Any], list[Any], list[list[Callable[..., str]]]]:
    """Where the pipeline generates with tools itself (held-out accuracy, eval): per prompt, its environment (or
    None), the conversation it starts from and the tools it may call (the stage's, and its environment's)."""
    environments = [make_environment() if make_environment else None for _ in prompts]
    conversations = [start_episode(env, prompt, row) if env else prompt
                     for env, prompt, row in zip(environments, prompts, rows)]
    return environments, conversations, [tools + (bound_tools(env) if env else []) for env in environments]


def episode_reward(environment: Any) -> float | None:
    """An environment's score of its finished rollout, where it keeps one (`get_reward`)."""
    return environment.get_reward() if hasattr(environment, "get_reward") else None


def start_episode(environment: Any, prompt: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a rollout starts from, as TRL builds it: `reset(**row)`'s text appended to the last user
    turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    observation = environment.reset(**row)
    if isinstance(observation, str):
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
    return messages


def bound_tools(environment: Any) -> list[Callable[..., str]]:
    """An environment's tool methods, bound to it: the tools of its one rollout."""
    return [getattr(environment, name) for name in tool_methods(type(environment))]
