#!/usr/bin/env bash
# Checks a FOCUS cost-and-usage CSV with the FinOps Foundation's own validator.
#
#   tools/focus_validate.sh FILE.csv
#
# The validator (focus-validator 1.0.0, the last release that runs on Python 3.11) checks
# the FOCUS 1.0 rules. It is installed once into a virtual environment under
# ${CARGO_TARGET_DIR:-target}/focus-venv from the package registry (the only network this
# script uses). Exits 0 only when every check passed; 1 when a check failed or errored; 2
# on a usage or setup problem (the validator could not be installed or run).
#
# Ciyuan writes FOCUS 1.2. The validator 1.0.0 does not reject extra columns (its schema is
# not strict), but its rule set predates the 1.0 names of a few columns and requires every
# 1.0 conditional column, so it is given a 1.0 projection of the file, built here:
#   - InvoiceIssuerName, ProviderName, PublisherName are copied as InvoiceIssuer, Provider,
#     Publisher, the names its rules use;
#   - ChargeType is added as a copy of ChargeCategory, because its SkuPriceId rule still
#     reads that pre-1.0 column (without it the rule errors instead of checking that
#     usage rows have a SkuPriceId);
#   - every column its 1.0 rules require that the export does not have (commitment
#     discounts, resources, RegionName, PricingCategory, Tags) is added, empty: they are
#     conditional columns for concepts Ciyuan does not have, null on every row;
#   - everything else, the 1.2-only columns included, is passed through unchanged and
#     checked where the 1.0 rules know the column.
# The 1.2-only columns are checked column by column in crates/ciyuan-report/tests/focus.rs.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 FILE.csv" >&2
  exit 2
fi
file=$1
if [ ! -f "$file" ]; then
  echo "focus_validate: no such file: $file" >&2
  exit 2
fi
file=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$target"
venv=$target/focus-venv
python=${FOCUS_VALIDATOR_PYTHON:-python3}

install() {
  # A marker written last: a venv left half-made by an interrupted install is rebuilt.
  if [ -f "$venv/.installed" ]; then
    return 0
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv" || return 1
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'focus-validator==1.0.0' 'multimethod<1.11' || return 1
  touch "$venv/.installed"
}

# Two test processes may reach here at once; the install is done under a lock.
exec 9>"$target/focus-venv.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi
if ! install; then
  echo "focus_validate: could not install focus-validator into $venv" >&2
  exit 2
fi
flock -u 9 2>/dev/null || true

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

status=0
"$venv/bin/python" - "$file" "$work/focus-1.0.csv" <<'PY' || status=$?
import csv
import os
import sys

src, projected = sys.argv[1], sys.argv[2]

# Names the validator's 1.0 rules use for columns FOCUS 1.0 calls otherwise.
COPIES = {
    "InvoiceIssuerName": "InvoiceIssuer",
    "ProviderName": "Provider",
    "PublisherName": "Publisher",
    "ChargeCategory": "ChargeType",
}
# Conditional 1.0 columns for concepts the export does not have: null on every row.
ABSENT = [
    "CommitmentDiscountCategory", "CommitmentDiscountId", "CommitmentDiscountName",
    "CommitmentDiscountStatus", "CommitmentDiscountType", "PricingCategory",
    "RegionId", "RegionName", "ResourceID", "ResourceName", "ResourceType", "Tags",
]

with open(src, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, strict=True))
if not rows:
    sys.exit(f"focus_validate: {src} is empty (no header)")
header = rows[0]
for name in COPIES:
    if name not in header:
        sys.exit(f"focus_validate: {src} has no {name} column")
for i, row in enumerate(rows[1:], start=2):
    if len(row) != len(header):
        sys.exit(f"focus_validate: line {i} has {len(row)} fields, the header {len(header)}")
copies = [(header.index(a), b) for a, b in COPIES.items() if b not in header]
absent = [c for c in ABSENT if c not in header]
with open(projected, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(header + [b for _, b in copies] + absent)
    for row in rows[1:]:
        w.writerow(row + [row[i] for i, _ in copies] + [""] * len(absent))

# From here on, an exception means the validator could not run (exit 3), which is not
# the same as the file failing its checks (exit 1).
try:
    # The validator reads its currency list by a path relative to the working directory.
    import focus_validator
    os.chdir(os.path.dirname(os.path.dirname(focus_validator.__file__)))

    from focus_validator.validator import Validator

    v = Validator(
        data_filename=projected,
        output_destination=None,
        output_type="console",
        rules_version="1.0",
    )
    v.spec_rules.load()
    # The validator's own loader is pandas' read_csv with its type guessing: a Decimal column
    # whose values are all whole numbers becomes int64 and fails "is decimal", an id of
    # digits becomes a number and fails "is string", and a model named "None" or "NA" becomes
    # null. FOCUS allows integer notation in Decimal columns, so the file is read with the
    # types the rules themselves declare instead, and only an empty field is null.
    from focus_validator.config_objects.common import DataTypeCheck, DataTypes
    import pandas as pd

    declared = {
        r.column_id: r.check.data_type
        for r in v.spec_rules.rules
        if isinstance(getattr(r, "check", None), DataTypeCheck)
    }
    try:
        v.focus_data = pd.read_csv(
            projected,
            dtype={c: ("float64" if t == DataTypes.DECIMAL else str) for c, t in declared.items()},
            keep_default_na=False,
            na_values=[""],
        )
    except ValueError as e:
        # A Decimal column holds something that is not a number: the validator's own
        # loader keeps it as text, and its "is decimal" check reports it.
        print(f"focus_validate: not every Decimal column is numeric ({e})", file=sys.stderr)
        v.focus_data = pd.read_csv(projected)
    result = v.spec_rules.validate(v.focus_data)
    v.outputter.write(result)
    counts = {}
    bad = []
    for check in result.checklist.values():
        counts[check.status.value] = counts.get(check.status.value, 0) + 1
        if check.status.value in ("failed", "errored"):
            bad.append(f"  {check.check_name} ({check.column_id}): {check.status.value}"
                       + (f": {check.error}" if check.error else ""))
    print("checks:", ", ".join(f"{k} {counts[k]}" for k in sorted(counts)))
    if bad or not counts.get("passed"):
        print("focus_validate: FOCUS 1.0 validation failed:", file=sys.stderr)
        print("\n".join(bad), file=sys.stderr)
        sys.exit(1)
    print(f"focus_validate: {src}: every FOCUS 1.0 check passed")
except SystemExit:
    raise
except Exception:
    import traceback
    traceback.print_exc()
    print("focus_validate: the validator could not run", file=sys.stderr)
    sys.exit(3)
PY
case $status in
  0) ;;
  1) exit 1 ;;
  *) exit 2 ;;
esac
