"""Pictures of a workflow: a 20,000-simulation fan-out, a GPU training step per result,
a reduction, a 4-rank job, an executable and an AI summary, drawn as six boxes.

    pip install ".[viz]" && python examples/pictures.py [flow.svg]

Writes the Graphviz picture (``.svg``, ``.png``, ``.pdf``: these need Graphviz's
``dot`` program, ``apt-get install graphviz``; ``.dot`` for the source, which needs
no Graphviz install) and prints the same graph as Mermaid for Markdown.
"""
import sys

import rhapsody_graph as rhapsody


@rhapsody.task
def simulate(i):
    return i * 0.5


@rhapsody.task(gpus=1)
def train(x):
    return x


@rhapsody.task(cpus=2)
def total(xs):
    return sum(xs)


@rhapsody.task(ranks=4)
def analyse(t):
    return t


def workflow():
    trained = rhapsody.map(train, rhapsody.map(simulate, range(20_000)))
    report = rhapsody.executable(["echo", "total", analyse(total(trained))])
    return rhapsody.Graph(rhapsody.ai("Summarise: {}", report, model="smollm2"))


if __name__ == "__main__":
    graph = workflow()
    out = sys.argv[1] if len(sys.argv) > 1 else "flow.svg"
    print(f"{len(graph):,} nodes drawn into {graph.visualize(out)}")
    print(graph.to_mermaid())
