"""``gptlab fit --tui``: the ranked table with sort/filter/search and a plan panel (Textual).

Keys: ``/`` search, ``s`` next sort order, ``f`` next fit filter, ``c`` next
context, ``u`` next quant (plan panel), ``q`` quit. Selecting a row (arrows)
shows that model's plan — the same ``make_plan`` the CLI prints.
"""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from gptlab.errors import GptlabError
from gptlab.fit.catalog import ModelSpec, catalog
from gptlab.fit.render import TABLE_COLUMNS, render_plan, row_cells
from gptlab.fit.hardware import Hardware
from gptlab.fit.plan import SORT_KEYS, make_plan, quants_for, rank, table_row

FIT_FILTERS = [None, "Perfect", "Good", "Marginal"]
CONTEXTS = [None, 2048, 4096, 8192, 32768, 131072]


class FitApp(App):
    """The fit table and plan panel for one machine."""

    CSS = """
    #status { height: auto; padding: 0 1; background: $boost; }
    #search { height: 3; }
    #table { width: 3fr; }
    #plan-scroll { width: 2fr; border-left: solid $accent; }
    """
    BINDINGS = [
        Binding("/", "focus_search", "search"),
        Binding("s", "next_sort", "sort"),
        Binding("f", "next_fit", "fit filter"),
        Binding("c", "next_context", "context"),
        Binding("u", "next_quant", "quant"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, hw: Hardware, specs: list[ModelSpec], engine: str = "llama.cpp", context: int | None = None):
        super().__init__()
        self.hw, self.specs, self.engine = hw, {s.name: s for s in specs}, engine
        self.sort = "fit"
        self.fit_filter: str | None = None
        self.search = ""
        self.context = context
        self.quant: str | None = None  # plan panel override; None = a GGUF file's own, else the best that fits
        self.rows = [table_row(s, hw, context, engine) for s in specs]
        self.shown: list[str] = []
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.hw.summary(), id="status")
        yield Input(placeholder="Press / to search models...", id="search")
        with Horizontal():
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="plan-scroll"):
                yield Static("", id="plan")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns(*TABLE_COLUMNS)
        self.refresh_table()
        table.focus()

    # ---- state -> widgets
    def status_line(self) -> str:
        ctx = self.context or "model max (<=8k)"
        return (f"{self.hw.summary()}\nSort [s]: {self.sort} | Fit [f]: {self.fit_filter or 'All'} | "
                f"Context [c]: {ctx} | Quant [u]: {self.quant or 'default'} | Models {len(self.shown)}/"
                f"{len(self.rows)} | engine {self.engine}")

    def refresh_table(self) -> None:
        rows = rank(self.rows, self.sort, fit=self.fit_filter, search=self.search or None)
        table = self.query_one(DataTable)
        table.clear()
        for r in rows:
            table.add_row(*row_cells(r), key=r.name)
        self.shown = [r.name for r in rows]
        self.query_one("#status", Static).update(self.status_line())
        if self.shown:
            self.show_plan(self.shown[0] if self.selected not in self.shown else self.selected)
        else:
            self.query_one("#plan", Static).update("No model matches.")

    def show_plan(self, name: str) -> None:
        self.selected = name
        try:
            plan = make_plan(self.specs[name], self.hw, context=self.clamped_context(name), quant=self.quant,
                             engine=self.engine)
            text = render_plan(plan)
        except GptlabError as e:
            text = f"{name}: {e}"
        self.query_one("#plan", Static).update(text)

    def clamped_context(self, name: str) -> int | None:
        return None if self.context is None else min(self.context, self.specs[name].context_length)

    # ---- events and actions
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value in self.specs:
            self.show_plan(event.row_key.value)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.search = event.value.strip()
        self.refresh_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def action_focus_search(self) -> None:
        self.query_one(Input).focus()

    def action_next_sort(self) -> None:
        keys = list(SORT_KEYS)
        self.sort = keys[(keys.index(self.sort) + 1) % len(keys)]
        self.refresh_table()

    def action_next_fit(self) -> None:
        self.fit_filter = FIT_FILTERS[(FIT_FILTERS.index(self.fit_filter) + 1) % len(FIT_FILTERS)]
        self.refresh_table()

    def action_next_context(self) -> None:
        self.context = CONTEXTS[(CONTEXTS.index(self.context) + 1) % len(CONTEXTS)]
        self.rows = [table_row(s, self.hw, self.context, self.engine) for s in self.specs.values()]
        self.refresh_table()

    def action_next_quant(self) -> None:
        options = [None] + quants_for(self.engine)
        self.quant = options[(options.index(self.quant) + 1) % len(options)]
        self.query_one("#status", Static).update(self.status_line())
        if self.selected:
            self.show_plan(self.selected)


def run_tui(hw: Hardware, extra_refs: list[str] | None = None, engine: str = "llama.cpp",
            context: int | None = None) -> None:
    """Open the interactive fit table (blocks until the user quits)."""
    FitApp(hw, catalog(extra_refs), engine, context).run()
