"""Checks a test script before any machine boots: it must compile, and every
global name it reads must be a builtin, the client API, a machine, or
defined by the script itself. Usage: check.py SCRIPT [MACHINE...]

Prints one `SCRIPT:LINE: message` per problem and exits 1 when there is one.
"""

import ast
import builtins
import difflib
import sys
import symtable

import vmlab


def defined_names(table):
    """Names the script binds at module level, or in a function after `global`."""
    names = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    return names | global_assignments(table)


def global_assignments(table):
    names = set()
    for child in table.get_children():
        names |= {s.get_name() for s in child.get_symbols() if s.is_declared_global() and s.is_assigned()}
        names |= global_assignments(child)
    return names


def global_reads(table):
    """Names read as globals anywhere in the script."""
    names = set()
    for s in table.get_symbols():
        if not s.is_referenced():
            continue
        if table.get_type() == "module" or s.is_global():
            names.add(s.get_name())
    for child in table.get_children():
        names |= global_reads(child)
    return names


def check(path, source, machines):
    try:
        tree = ast.parse(source, path)
        table = symtable.symtable(source, path, "exec")
    except SyntaxError as e:
        return [f"{path}:{e.lineno}: syntax error: {e.msg}"]
    bound = vmlab.bind(machines)
    known = set(dir(builtins)) | set(bound) | defined_names(table) | {"__file__"}
    unknown = global_reads(table) - known
    first_line = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in unknown:
            first_line[node.id] = min(first_line.get(node.id, node.lineno), node.lineno)
    problems = []
    machine_names = sorted(n for n in bound if isinstance(bound[n], vmlab.Machine))
    for name in sorted(unknown, key=lambda n: (first_line.get(n, 0), n)):
        hint = difflib.get_close_matches(name, machine_names + sorted(known - set(dir(builtins))), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        problems.append(
            f"{path}:{first_line.get(name, 1)}: name {name!r} is not defined{suggestion} "
            f"(machines: {', '.join(machine_names) or 'none'})"
        )
    return problems


def main(argv):
    path, machines = argv[1], argv[2:]
    with open(path, encoding="utf-8") as f:
        problems = check(path, f.read(), machines)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
