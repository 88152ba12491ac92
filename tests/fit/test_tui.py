"""The Textual UI, driven headlessly with App.run_test()'s pilot."""

import asyncio

from textual.widgets import DataTable, Static

from gptlab.fit.catalog import catalog
from gptlab.fit.tui import FitApp

from fit_machines import make_hw


def _names(app):
    table = app.query_one(DataTable)
    return [table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(table.row_count)]


def test_tui_table_sort_filter_search_and_plan():
    async def scenario():
        app = FitApp(make_hw(ram=16), catalog())
        async with app.run_test(size=(200, 60)) as pilot:
            table = app.query_one(DataTable)
            assert table.row_count == len(app.rows) > 10
            assert "Plan: " in str(app.query_one("#plan", Static).render())
            await pilot.press("s")  # fit -> tps
            assert app.sort == "tps"
            await pilot.press("s")  # tps -> params
            names = _names(app)
            params = [app.specs[n].params_total for n in names]
            assert params == sorted(params, reverse=True)
            await pilot.press("/")
            for ch in "smollm2":
                await pilot.press(ch)
            await pilot.pause()
            assert set(_names(app)) == {"smollm2-135m", "smollm2-360m", "smollm2-1.7b"}
            await pilot.press("enter")  # back to the table
            await pilot.press("down")
            await pilot.pause()
            assert app.selected == _names(app)[1]
            assert f"Plan: {app.selected}" in str(app.query_one("#plan", Static).render())
            await pilot.press("u")  # quant override -> first of the ladder
            assert app.quant == "BF16" and "quant BF16" in str(app.query_one("#plan", Static).render())
            await pilot.press("f", "f", "f")  # All -> Perfect -> Good -> Marginal
            assert app.fit_filter == "Marginal"
            await pilot.press("q")

    asyncio.run(scenario())
