#!/usr/bin/env bash
# Runs every Fuzz* target in the module for a bounded time each ($1, e.g. 10s).
#
# Go's fuzz coordinator can report a bare "context deadline exceeded" as a
# failure when -fuzztime runs out while a worker is mid-input
# (go.dev/issue/75804, fixed in Go 1.27; this module builds with 1.26). A
# real failure always writes its input under testdata/fuzz/<target>/, so a
# failed run counts only when it left such a file, or failed otherwise.
set -euo pipefail
t=${1:-10s}
go list -f '{{.ImportPath}} {{.Dir}}' ./... | while read -r pkg dir; do
	for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
		echo "fuzz $pkg $f ($t)"
		corpus="$dir/testdata/fuzz/$f"
		before=$(ls "$corpus" 2>/dev/null | sort || true)
		out=$(mktemp)
		if go test -run='^$' -fuzz="^$f\$" -fuzztime="$t" "$pkg" 2>&1 | tee "$out"; then
			rm -f "$out"
			continue
		fi
		after=$(ls "$corpus" 2>/dev/null | sort || true)
		if [ "$before" = "$after" ] && grep -q '^    context deadline exceeded$' "$out" &&
			! grep -q -e 'panic:' -e 'Failing input written' "$out"; then
			echo "fuzz $f: stopped by go.dev/issue/75804 at the time limit, no failing input: not a failure"
			rm -f "$out"
			continue
		fi
		rm -f "$out"
		echo "fuzz $f: FAILED (a failing input is under $corpus)" >&2
		exit 1
	done
done
