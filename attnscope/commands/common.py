"""Flag syntax and checks shared by the subcommands: ``--layers`` / ``--keep-qk`` and the claim
of the run directory a command writes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from attnscope.atomic import check_target, claim

if TYPE_CHECKING:
    from attnscope.models.loaded import LoadedModel

LAYERS_SYNTAX = (
    "comma-separated layer indices and START:END ranges (END excluded; an open START is 0, an "
    "open END the last layer), e.g. 0,3,5 or 2:6 or 0,2:4 or 2:"
)


@dataclass(frozen=True)
class Layers:
    """A parsed layer selection: ``[start, end)`` ranges, ``end`` None up to the last layer."""

    flag: str
    text: str
    ranges: tuple[tuple[int, int | None], ...]

    @property
    def open_ended(self) -> bool:
        """Whether resolving needs the model's layer count."""
        return any(end is None for _, end in self.ranges)

    def indices(self, n_layers: int | None = None) -> list[int]:
        """The sorted layer indices; ``n_layers`` (the model's) closes open ranges and checks that
        every index exists."""
        selected: set[int] = set()
        for start, end in self.ranges:
            stop = n_layers if end is None else end
            if stop is None:
                raise ValueError(f"{self.flag} {self.text}: an open range needs the layer count")
            if n_layers is not None and (stop > n_layers or start >= stop):
                raise ValueError(
                    f"{self.flag} {self.text}: the model has {n_layers} layers (0 to {n_layers - 1})"
                )
            selected.update(range(start, stop))
        return sorted(selected)

    def span(self, n_layers: int) -> tuple[int, int]:
        """The one contiguous ``[start, end)`` range these layers form; an error otherwise."""
        indices = self.indices(n_layers)
        if indices != list(range(indices[0], indices[-1] + 1)):
            raise ValueError(f"{self.flag} {self.text}: expected one contiguous range such as 2:6")
        return indices[0], indices[-1] + 1


def parse_layers(text: str, flag: str = "--layers") -> Layers:
    """``"0,2:4,6:"`` -> Layers with ranges (0, 1), (2, 4), (6, None); a clear error otherwise."""
    ranges = []
    for part in text.split(","):
        try:
            if ":" in part:
                start, end = part.split(":")
                item = (int(start) if start.strip() else 0, int(end) if end.strip() else None)
            else:
                item = (int(part), int(part) + 1)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected {LAYERS_SYNTAX}") from None
        if item[0] < 0 or (item[1] is not None and item[1] <= item[0]):
            raise ValueError(
                f"{flag} {text!r}: {part.strip()!r} selects no layer (indices start at 0, "
                "START:END needs START < END)"
            )
        ranges.append(item)
    return Layers(flag, text, tuple(ranges))


def parse_keep_qk(text: str | None) -> Layers | bool:
    """``--keep-qk``: None -> False, ``all`` -> True, else the ``--layers`` syntax."""
    if text is None:
        return False
    return True if text == "all" else parse_layers(text, "--keep-qk")


def resolve(choice: Layers | bool | None, n_layers: int | None) -> list[int] | bool | None:
    """Layer indices of a parsed selection; None, True and False unchanged."""
    return choice.indices(n_layers) if isinstance(choice, Layers) else choice


def layer_count(lm: LoadedModel) -> int:
    """Number of decoder layers of the model's text stack (the layers ``--layers`` counts)."""
    return lm.model.config.get_text_config().num_hidden_layers


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that may not be written (``attnscope.atomic.check_target``): called
    before the slow part."""
    check_target(out, overwrite)


@contextmanager
def writing_run(out: Path, overwrite: bool) -> Iterator[None]:
    """Hold the writer lock of run directory ``out`` for the whole command (a second writer is
    refused at once, not after its work) and refuse an ``out`` that may not be written."""
    with claim(out):
        check_target(out, overwrite)
        yield
