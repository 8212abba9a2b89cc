"""Print setup.py's lower bounds as exact pins (`name==version`), one per line: the constraints of
`make test-oldest`. setup.py is read, not run (it imports torch and builds extensions)."""
import ast
import re
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "setup.py"
LOWER = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*[^;]*?>=\s*([0-9][^,;\s]*)")


def requirement_strings(tree):
    """Every string inside the literal INSTALL_REQUIRES list and EXTRAS dict of setup.py."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("INSTALL_REQUIRES", "EXTRAS")
                                                for t in node.targets):
            value = ast.literal_eval(node.value)
            for item in (value if isinstance(value, list) else [r for reqs in value.values() for r in reqs]):
                yield item


def main():
    pins, unbounded = {}, []
    for req in requirement_strings(ast.parse(SETUP.read_text())):
        match = LOWER.match(req)
        name = re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower()
        if name == "torch":
            continue  # the machine's wheel (requirements/torch.txt) in every environment
        if match is None:
            unbounded.append(req)
        else:
            pins[name] = match.group(2)
    if unbounded:
        sys.exit(f"setup.py: these requirements have no lower bound (>=) to test: {', '.join(sorted(set(unbounded)))}")
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
