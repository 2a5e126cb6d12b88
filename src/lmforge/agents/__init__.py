"""Agents: ReAct and CodeAct loops, tools and the sandbox that runs model-written code."""
