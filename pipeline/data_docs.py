"""Great Expectations part of the validate step: the expectation suite, its run, and the Data Docs site.

``pipeline.validate`` runs the suite on the manifest (:class:`GxValidation`), adds the rules it
checks in Python, and then builds the Data Docs site with *all* of its findings attached, so the
page a person opens (``data/validation/docs/index.html``) shows what ``report.json`` holds:

* the data asset is named (``<source>-manifest``) and the run is named after the data version
  (``manifest-sha256-<16 hex>`` of ``manifest.parquet``) at the validation time (UTC), instead of
  GX's ``Data asset: None`` and ``__none__`` for a data frame asset;
* a section "LERENet validation" right after GX's overview gives the overall result (GX suite and
  Python rules together), every failure with what to do, every row excluded from
  ``validated.parquet`` (empty masks, repeated copies), every file of the source that ingest did not
  use, the near-duplicate pairs that were reported and not fatal, and other warnings.

The pages load Bootstrap, jQuery and Font Awesome from a CDN (GX's page template); offline they
render unstyled, with all text and tables present.
"""

from __future__ import annotations

import html
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before great_expectations is imported

from great_expectations.render.components import (  # noqa: E402
    RenderedHeaderContent, RenderedSectionContent, RenderedStringTemplateContent, RenderedTableContent)
from great_expectations.render.renderer import ValidationResultsPageRenderer  # noqa: E402

from pipeline.config import Params  # noqa: E402
from pipeline.images import replace_dir  # noqa: E402

SUITE_NAME = "manifest"
SITE_NAME = "lerenet"
META_KEY = "lerenet"  # key of the validate step's findings in the validation result's meta


def build_suite(gx: Any, gxe: Any, params: Params, hints: dict[str, str]) -> Any:
    """The manifest expectation suite; each expectation's ``meta`` holds its rule name and hint."""
    from great_expectations.expectations.row_conditions import Column

    defect = {"row_condition": Column("kind") == "defect"}
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    exps = [
        ("decodes", gxe.ExpectColumnValuesToBeNull(column="error")),
        ("unique_image", gxe.ExpectColumnValuesToBeUnique(column="sha256")),
        ("id_format", gxe.ExpectColumnValuesToMatchRegex(column="id", regex=r"^[0-9a-f]{16}$")),
        ("class_in_fold_table", gxe.ExpectColumnValuesToBeInSet(column="class_name", value_set=params.all_classes)),
        ("fold_class_has_data", gxe.ExpectColumnDistinctValuesToContainSet(column="class_name",
                                                                             value_set=params.all_classes)),
        ("kind", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["defect", "normal"])),
        ("image_size", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=1)),
        ("image_size", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=1)),
        ("channels", gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[1, 3])),
        ("mask_present", gxe.ExpectColumnValuesToNotBeNull(column="mask_path", **defect)),
        ("mask_same_size", gxe.ExpectColumnPairValuesToBeEqual(column_A="width", column_B="mask_width",
                                                               ignore_row_if="either_value_is_missing", **defect)),
        ("mask_same_size", gxe.ExpectColumnPairValuesToBeEqual(column_A="height", column_B="mask_height",
                                                               ignore_row_if="either_value_is_missing", **defect)),
        ("mask_binarisable", gxe.ExpectColumnValuesToBeBetween(column="soft_fraction", min_value=0.0,
                                                               max_value=params.data.max_soft_fraction, **defect)),
    ]
    for rule, exp in exps:
        exp.meta = {"rule": rule, "hint": hints[rule]}
        suite.add_expectation(exp)
    return suite


class GxValidation:
    """One run of the manifest suite in an ephemeral GX context, then its Data Docs site.

    Args:
        params: validated parameters (fold table, ``data.max_soft_fraction``).
        hints: what to do, per rule (``pipeline.validate.HINTS``).
        asset_name: the data asset's name shown in Data Docs (letters, digits, ``-_.``).
        run_name: the run's name (the data version).
    """

    def __init__(self, params: Params, hints: dict[str, str], asset_name: str, run_name: str):
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.core.run_identifier import RunIdentifier

        self._gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = {"globally": False}
        for site in list(self.ctx.list_data_docs_sites()):  # the default site writes to a temp folder
            self.ctx.delete_data_docs_site(site)
        asset = self.ctx.data_sources.add_pandas("lerenet").add_dataframe_asset(asset_name)
        batch_def = asset.add_batch_definition_whole_dataframe("manifest")
        suite = self.ctx.suites.add(build_suite(gx, gxe, params, hints))
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=SUITE_NAME, data=batch_def, suite=suite))
        self.checkpoint = self.ctx.checkpoints.add(gx.Checkpoint(
            name=SUITE_NAME, validation_definitions=[vd], result_format={"result_format": "COMPLETE"}, actions=[]))
        self.run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(timezone.utc))
        self.key: Any = None
        self.result: Any = None

    def run(self, manifest: pd.DataFrame) -> Any:
        """Validate ``manifest``; returns the GX ``ExpectationSuiteValidationResult``."""
        # GX reads pandas' nullable/arrow dtypes poorly: hand it plain object/float columns
        frame = manifest.astype(object).where(manifest.notna(), None)
        for col in ("fg_fraction", "soft_fraction"):
            frame[col] = manifest[col].astype("float64")
        result = self.checkpoint.run(batch_parameters={"dataframe": frame}, run_id=self.run_id)
        self.key, self.result = next(iter(result.run_results.items()))
        return self.result

    def summary(self) -> dict:
        """JSON-able summary: ``success``, ``statistics``, one entry per expectation (rule, type, column,
        success, unexpected_count)."""
        vr = self.result
        out = {"success": bool(vr.success), "asset": vr.asset_name, "run_name": self.run_id.run_name,
               "statistics": {k: (float(v) if v is not None else None) for k, v in vr.statistics.items()},
               "expectations": []}
        for r in vr.results:
            cfg = r.expectation_config
            out["expectations"].append({
                "rule": cfg.meta.get("rule"), "type": cfg.type,
                "column": cfg.kwargs.get("column") or f'{cfg.kwargs.get("column_A")}={cfg.kwargs.get("column_B")}',
                "success": bool(r.success), "unexpected_count": int(r.result.get("unexpected_count") or 0)})
        return out

    def build_docs(self, docs_dir: Path, findings: dict) -> Path:
        """Build the Data Docs site into ``docs_dir`` (built aside, swapped in) with ``findings`` shown.

        ``findings`` is the JSON-able dict :func:`findings_section` renders (``success``, ``failures``,
        ``excluded``, ``skipped``, ``near_duplicates``, ``warnings``). Returns ``docs_dir/index.html``.
        """
        from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

        stage = docs_dir.parent / f".docs.tmp-{uuid.uuid4().hex[:8]}"
        self.ctx.add_data_docs_site(SITE_NAME, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(stage)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_how_to_buttons": False},
            "site_section_builders": {"validations": {"renderer": {
                "module_name": __name__, "class_name": ValidationPageRenderer.__name__}}},
        })
        self.result.meta[META_KEY] = findings
        self.ctx.validation_results_store.set(self.key, self.result)
        docs_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.ctx.build_data_docs(site_names=[SITE_NAME], resource_identifiers=[
                self.key, ExpectationSuiteIdentifier(name=SUITE_NAME)])
            pages = list((stage / "validations").rglob("*.html")) if (stage / "validations").is_dir() else []
            if len(pages) != 1:  # GX logs a failed page render and goes on: never publish a site without it
                raise RuntimeError(f"Great Expectations did not render the validation page into {stage} "
                                   f"(found {len(pages)} pages); see the log above")
            replace_dir(stage, docs_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return docs_dir / "index.html"


# ---------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------
def _h(text: str, tag: str = "h5") -> RenderedStringTemplateContent:
    return RenderedStringTemplateContent(content_block_type="string_template", string_template={
        "template": html.escape(text), "tag": tag, "styling": {"classes": ["m-0"]}})


def _table(title: str, header: list[str], rows: list[list[Any]], empty: str) -> RenderedTableContent:
    cells = [[html.escape("" if v is None else str(v)) for v in row] for row in rows] or [[html.escape(empty)]
                                                                                          + [""] * (len(header) - 1)]
    return RenderedTableContent(header=_h(f"{title} ({len(rows)})", "h6"), header_row=header, table=cells,
                                table_options={"search": len(rows) > 10}, styling={
                                    "classes": ["col-12", "table-responsive", "mt-1"],
                                    "body": {"classes": ["table", "table-sm"]}})


def findings_section(findings: dict) -> RenderedSectionContent:
    """The "LERENet validation" section of the validation page: overall result, failures, exclusions,
    files skipped by ingest, near-duplicates reported, warnings (every value HTML-escaped)."""
    ok = findings.get("success")
    n_fail = len(findings.get("failures", []))
    status = "PASSED" if ok else f"FAILED ({n_fail} problems)"
    blocks: list[Any] = [RenderedHeaderContent(
        header=_h(f"LERENet validation: {status}"),
        subheader=_h(f"data version {findings.get('data_version')} | data folder {findings.get('data_dir')} | "
                     f"source {findings.get('source')} | GX suite and Python rules together; report: "
                     f"{findings.get('report')}", "p"),
        styling={"classes": ["col-12", "p-0"], "header": {"classes": ["alert",
                                                                        "alert-success" if ok else "alert-danger"]}})]
    blocks.append(_table("Failures (validated.parquet is not written)", ["rule", "row", "file", "problem",
                                                                         "what to do"],
                         [[f["rule"], f["row"], f["file"], f["detail"], f.get("hint", "")]
                          for f in findings.get("failures", [])], "none"))
    blocks.append(_table("Excluded from validated.parquet", ["row", "file", "reason"],
                         [[e["row"], e["file"], e["reason"]] for e in findings.get("excluded", [])], "none"))
    blocks.append(_table("Files of the source not used by ingest", ["file", "reason", "what to do", "fails rule"],
                         [[s["path"], s["reason"], s["action"], s.get("rule") or "no (warning)"]
                          for s in findings.get("skipped", [])], "none"))
    nd = findings.get("near_duplicates", {})
    pairs = [[kind, " | ".join(p["files"]), p["distance"]]
             for kind in ("allowed", "within_class", "involving_normal_or_excluded") for p in nd.get(kind, [])]
    blocks.append(_table(f"Near-duplicate pairs reported, not fatal (pHash distance <= {nd.get('max_distance')})",
                         ["kind", "files", "distance"], pairs, "none"))
    blocks.append(_table("Warnings", ["warning"], [[w] for w in findings.get("warnings", [])], "none"))
    return RenderedSectionContent(section_name="LERENet validation", content_blocks=blocks)


class ValidationPageRenderer(ValidationResultsPageRenderer):
    """GX's validation page, with the data asset named and the validate step's findings added.

    GX takes the asset name from ``meta.batch_spec.data_asset_name``, which a data frame asset does
    not set; here it falls back to the result's ``asset_name``. The findings (``meta["lerenet"]``)
    become a section right after the overview (:func:`findings_section`).
    """

    def render(self, validation_results: Any, suite_parameters: Any = None) -> Any:
        """Render one validation result to a GX ``RenderedDocumentContent``."""
        meta = validation_results.meta
        spec = dict(meta.get("batch_spec") or {})
        if not spec.get("data_asset_name"):
            spec["data_asset_name"] = validation_results.asset_name
            spec.pop("batch_data", None)  # a placeholder string for the in-memory frame
            meta["batch_spec"] = spec
        doc = super().render(validation_results, suite_parameters)
        if meta.get(META_KEY):
            doc.sections.insert(1, findings_section(meta[META_KEY]))
        return doc
