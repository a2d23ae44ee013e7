#!/usr/bin/env python3
"""Checks the shape of the code: no function over 80 lines, no class over 400, and no cycle
among the project's modules (imports at module level). Prints what it finds; exit 1 if any.

Usage: python tools/check_layout.py [folder]   (default: the project root)
"""
import ast
import glob
import os
import sys

MAX_FUNCTION, MAX_CLASS = 80, 400


def sizes(tree, path):
    for node in ast.walk(tree):
        size = (node.end_lineno or 0) - node.lineno + 1 if hasattr(node, 'lineno') else 0
        if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
            yield '%s: class %s has %d lines (at most %d)' % (path, node.name, size, MAX_CLASS)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION:
            yield '%s: function %s has %d lines (at most %d)' % (path, node.name, size, MAX_FUNCTION)


def module_imports(tree, ours):
    """The project's modules imported at module level (not inside functions)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in ours)
        elif isinstance(node, ast.ImportFrom) and node.module in ours and not node.level:
            found.add(node.module)
    return found


def cycles(graph):
    """Every cycle of the import graph, each once, as a list of module names."""
    found, state, stack = [], {}, []

    def visit(mod):
        state[mod] = 'open'
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 'open':
                cycle = stack[stack.index(dep):] + [dep]
                found.append(cycle)
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 'done'

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    return found


def check(root):
    paths = sorted(glob.glob(os.path.join(root, '*.py')))
    ours = {os.path.splitext(os.path.basename(p))[0] for p in paths}
    problems, graph = [], {}
    for path in paths:
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        problems += list(sizes(tree, os.path.basename(path)))
        graph[os.path.splitext(os.path.basename(path))[0]] = module_imports(tree, ours)
    problems += ['import cycle: %s' % ' -> '.join(c) for c in cycles(graph)]
    return problems


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems = check(root)
    for line in problems:
        print(line)
    print('layout: %d problem(s)' % len(problems))
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
