"""A class table editor: name, colour, prompt, label value; add, remove, rename (edit the name)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from qgis.gui import QgsColorButton
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QPushButton, QTableWidget,
                                 QTableWidgetItem, QVBoxLayout, QWidget)

from .. import classtable
from ..classtable import ClassEntry

COL_NAME, COL_COLOUR, COL_PROMPT, COL_VALUE, COL_FROM = range(5)
HEADERS = ["Class name", "Colour", "Prompt (text for the model)", "Label value", "From base model"]
TOOLTIPS = ["The class name shown in legends and tables; edit it to rename the class.",
            "The class colour in maps and legends.",
            "A short description the model reads, e.g. \u201cA satellite image of greenhouses\u201d.",
            "The pixel value (class raster) or field value (polygon labels) that marks this class in "
            "the labels; blank = the class's position in this table (0, 1, 2, ...).",
            "The base model's class this row continues (what it has learnt is kept, also when you rename "
            "the class); blank = a new class."]


class ClassTableWidget(QWidget):
    """The editor. :meth:`entries` / :meth:`set_entries` round-trip a list of ClassEntry."""

    changed = pyqtSignal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.table = QTableWidget(0, len(HEADERS), self)
        self.table.setHorizontalHeaderLabels(HEADERS)
        for i, tip in enumerate(TOOLTIPS):
            self.table.horizontalHeaderItem(i).setToolTip(tip)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(COL_NAME, QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(COL_COLOUR, QHeaderView.ResizeMode.Fixed)
        header.setSectionResizeMode(COL_PROMPT, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(COL_VALUE, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(COL_FROM, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setColumnWidth(COL_NAME, 150)
        self.table.setColumnWidth(COL_COLOUR, 90)
        self.table.itemChanged.connect(lambda *_: self.changed.emit())
        self.add_button = QPushButton("Add class", self)
        self.remove_button = QPushButton("Remove", self)
        self.add_button.setToolTip("Add a new class (then type its name, prompt and label value).")
        self.remove_button.setToolTip("Remove the selected classes from the new model.")
        self.add_button.clicked.connect(lambda: self.add_entry(ClassEntry(self._new_name())))
        self.remove_button.clicked.connect(self.remove_selected)
        self.buttons = QHBoxLayout()
        self.buttons.addWidget(self.add_button)
        self.buttons.addWidget(self.remove_button)
        self.buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.table)
        lay.addLayout(self.buttons)

    # -- rows --------------------------------------------------------------------------------------
    def _new_name(self) -> str:
        names = {e.name for e in self.entries()}
        i = 1
        while f"new class {i}" in names:
            i += 1
        return f"new class {i}"

    def add_entry(self, entry: ClassEntry) -> int:
        row = self.table.rowCount()
        self.table.blockSignals(True)
        self.table.insertRow(row)
        self.table.setItem(row, COL_NAME, QTableWidgetItem(entry.name))
        button = QgsColorButton(self.table)
        button.setAllowOpacity(False)
        button.setShowNoColor(False)
        used = [e.colour for e in self.entries()[:row]]
        colour = entry.colour or next((c for c in classtable.PALETTE if c not in used), classtable.palette_colour(row))
        button.setColor(QColor(colour))
        button.setToolTip(TOOLTIPS[COL_COLOUR])
        button.colorChanged.connect(lambda *_: self.changed.emit())
        self.table.setCellWidget(row, COL_COLOUR, button)
        self.table.setItem(row, COL_PROMPT, QTableWidgetItem(entry.prompt or classtable.default_prompt(entry.name)))
        value = QTableWidgetItem("" if entry.value is None else str(entry.value))
        self.table.setItem(row, COL_VALUE, value)
        source = QTableWidgetItem(entry.source or "")
        source.setFlags(source.flags() & ~Qt.ItemFlag.ItemIsEditable)
        source.setToolTip(TOOLTIPS[COL_FROM])
        self.table.setItem(row, COL_FROM, source)
        self.table.blockSignals(False)
        self.changed.emit()
        return row

    def set_entries(self, entries: Sequence[ClassEntry]) -> None:
        self.table.setRowCount(0)
        for e in entries:
            self.add_entry(e)
        self.changed.emit()

    def merge_entries(self, entries: Sequence[ClassEntry]) -> Tuple[int, int]:
        """Merge classes found in the labels: a class whose name is in the table gets the label's value;
        a value already in the table is skipped; anything else is added. Returns (added, updated)."""
        added = updated = 0
        for e in entries:
            have = self.entries()
            values = {str(h.value) for h in have if h.value is not None}
            rows = {h.name.lower(): r for r, h in enumerate(have)}
            if e.name.lower() in rows:
                r = rows[e.name.lower()]
                if e.value is not None and str(have[r].value) != str(e.value):
                    self.table.item(r, COL_VALUE).setText(str(e.value))
                    updated += 1
                continue
            if e.value is not None and str(e.value) in values:
                continue
            self.add_entry(e)
            added += 1
        return added, updated

    def remove_selected(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True)
        if not rows and self.table.currentRow() >= 0:
            rows = [self.table.currentRow()]
        for r in rows:
            self.table.removeRow(r)
        self.changed.emit()

    def entries(self) -> List[ClassEntry]:
        out = []
        for r in range(self.table.rowCount()):
            name = self._text(r, COL_NAME)
            button = self.table.cellWidget(r, COL_COLOUR)
            colour = button.color().name().upper() if button is not None else ""
            prompt = self._text(r, COL_PROMPT)
            value = classtable.coerce_value(self._text(r, COL_VALUE))
            out.append(ClassEntry(name, colour, prompt, value, self._text(r, COL_FROM) or None))
        return out

    def _text(self, row: int, col: int) -> str:
        item = self.table.item(row, col)
        return item.text().strip() if item is not None else ""

    def rename(self, row: int, name: str) -> None:
        self.table.item(row, COL_NAME).setText(name)
