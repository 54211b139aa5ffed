#!/usr/bin/env python3
"""The GPU check's closing table: gtest totals from the XML report, then one row per benchmark with its time,
TFLOP/s or GB/s and the share of the ceiling (standard library only: runs with any python3 on a GPU node)."""
import json
import sys
import xml.etree.ElementTree as ET


def tests_summary(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return f"gpu tests: no report ({e})"
    total = int(root.get("tests", 0))
    failures = int(root.get("failures", 0)) + int(root.get("errors", 0))
    skipped = int(root.get("skipped", 0)) + int(root.get("disabled", 0))
    names = []
    for suite in root.iter("testsuite"):
        for case in suite.iter("testcase"):
            if case.find("failure") is not None:
                names.append(f"{suite.get('name')}.{case.get('name')}")
    line = f"gpu tests: {total - failures - skipped} passed, {failures} failed, {skipped} skipped"
    return line + ("\n  failed: " + ", ".join(names) if names else "")


def bench_rows(path):
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as e:
        return [f"benchmarks: no results ({e})"]
    rows = [f"{'benchmark':58} {'ms':>9} {'TFLOP/s':>9} {'GB/s':>9} {'ceiling%':>9}"]
    for b in data.get("benchmarks", []):
        if b.get("run_type") == "aggregate":
            continue
        ms = b.get("real_time", 0.0)
        unit = b.get("time_unit", "ms")
        ms = ms / 1e3 if unit == "us" else ms * 1e3 if unit == "s" else ms / 1e6 if unit == "ns" else ms
        tf = b.get("TFLOP/s")
        gb = b.get("GB/s")
        ce = b.get("ceiling%")
        fmt = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9}"
        err = b.get("error_message")
        if err:
            rows.append(f"{b['name'][:58]:58} error: {err}")
            continue
        rows.append(f"{b['name'][:58]:58} {ms:9.3f} {fmt(tf)} {fmt(gb)} {fmt(ce)}")
    return rows


def main():
    print(tests_summary(sys.argv[1]))
    for row in bench_rows(sys.argv[2]):
        print(row)


if __name__ == "__main__":
    main()
