"""The tools a ReAct agent calls by name: ``calculator[EXPR]``, ``search[QUERY]`` (top hits of any `Retriever`, such
as lmforge.rag's Index) and ``lookup[TERM]`` (the next sentence of the last search's results that mentions TERM, as
in the ReAct paper). A tool's answer becomes the observation: one line, clipped; a tool's error becomes
``Error: <reason>``, and an unknown tool name an observation listing the tools, so the loop always goes on."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lmforge.agents.calculator import calculate
from lmforge.data.formats import SEARCH_HITS, SEARCH_SEPARATOR, TOOL_NAMES
from lmforge.errors import ConfigError, LmforgeError, one_line

MAX_OBSERVATION_CHARS = 400
Tool = Callable[[str], str]


class Hit(Protocol):
    doc_id: str
    text: str


class Retriever(Protocol):
    def search(self, query: str, k: int = 5) -> list[Hit]: ...


class ToolError(LmforgeError):
    """A tool could not answer (one line); it becomes the observation ``Error: <reason>``."""


@dataclass
class DocumentTools:
    """search: the top `k` hits of `retriever` for a query, joined by `SEARCH_SEPARATOR` as the SFT data writes them;
    lookup: the next sentence of those hits that mentions a term (case-insensitive), from the first after each
    search."""

    retriever: Retriever
    k: int = SEARCH_HITS
    passages: list[str] = field(default_factory=list)
    shown: dict[str, int] = field(default_factory=dict)  # term -> matching sentences returned since the last search

    def search(self, query: str) -> str:
        if not query.strip():
            raise ToolError("empty search query; write search[words to look for]")
        hits = self.retriever.search(query, k=self.k)
        self.passages, self.shown = [hit.text for hit in hits], {}
        return SEARCH_SEPARATOR.join(self.passages) if hits else f"No results for {query!r}"

    def lookup(self, term: str) -> str:
        term = term.strip()
        if not term:
            raise ToolError("empty lookup term; write lookup[word]")
        if not self.passages:
            raise ToolError("nothing to look in yet: search first")
        sentences = [s for p in self.passages for s in re.split(r"(?<=[.!?])\s+", p) if term.lower() in s.lower()]
        seen = self.shown.get(term.lower(), 0)
        if seen >= len(sentences):
            return f"No {'more ' if seen else ''}sentences mention {term!r} in the search results"
        self.shown[term.lower()] = seen + 1
        return sentences[seen]


class ToolRegistry:
    """Tools by name; `run` turns every outcome into an observation line."""

    def __init__(self, tools: dict[str, Tool]):
        self.tools = dict(tools)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def run(self, name: str, argument: str) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return f"Unknown tool {name}; the tools are: {', '.join(self.tools)}"
        try:
            result = tool(argument)
        except LmforgeError as err:
            result = f"Error: {err}"
        result = one_line(result)
        return result if len(result) <= MAX_OBSERVATION_CHARS else result[:MAX_OBSERVATION_CHARS - 3] + "..."


def make_tools(names: Sequence[str], retriever: Retriever | None = None, k: int = SEARCH_HITS) -> ToolRegistry:
    """A fresh registry (lookup keeps per-run state: make one per question) of the tools `names`, in that order."""
    unknown = [n for n in names if n not in TOOL_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown tool {unknown[0]!r}; the tools are {', '.join(TOOL_NAMES)}" if unknown else
                          f"no tools given; choose some of {', '.join(TOOL_NAMES)}")
    if ("search" in names or "lookup" in names) and retriever is None:
        raise ConfigError("the search and lookup tools need a document index: pass --index INDEX (built by "
                          "`lmforge rag index`)")
    if "lookup" in names and "search" not in names:
        raise ConfigError("lookup reads the last search's results; add the search tool (--tools search,lookup)")
    made: dict[str, Tool] = {"calculator": calculate}
    if retriever is not None:
        documents = DocumentTools(retriever, k)
        made |= {"search": documents.search, "lookup": documents.lookup}
    return ToolRegistry({name: made[name] for name in dict.fromkeys(names)})
