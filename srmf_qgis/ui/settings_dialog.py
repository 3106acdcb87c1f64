"""Settings: the engine's Python interpreter, the default device, "Install dependencies…" and
"Diagnostics"."""
from __future__ import annotations

from qgis.core import Qgis, QgsApplication, QgsTask
from qgis.gui import QgsFileWidget, QgsMessageBar
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QFont, QGuiApplication
from qgis.PyQt.QtWidgets import (QApplication, QComboBox, QDialog, QDialogButtonBox, QFormLayout, QHBoxLayout,
                                 QLabel, QPlainTextEdit, QProgressBar, QPushButton, QSizePolicy, QVBoxLayout)

from .. import environment, runtime

DEVICES = [("auto", "Automatic (a CUDA GPU if there is one, else the CPU)"), ("cpu", "CPU"), ("cuda", "CUDA GPU")]


class TextReportDialog(QDialog):
    """A read-only monospaced report with a "Copy to clipboard" button."""

    def __init__(self, title: str, text: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle(title)
        self.resize(760, 560)
        self.text = QPlainTextEdit(self)
        self.text.setReadOnly(True)
        self.text.setFont(QFont("monospace"))
        self.text.setPlainText(text)
        copy = QPushButton("Copy to clipboard", self)
        copy.clicked.connect(self.copy)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        buttons.addButton(copy, QDialogButtonBox.ButtonRole.ActionRole)
        lay = QVBoxLayout(self)
        lay.addWidget(self.text)
        lay.addWidget(buttons)

    def copy(self):
        QGuiApplication.clipboard().setText(self.text.toPlainText())


def show_diagnostics(parent=None) -> TextReportDialog:
    QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
    try:
        text = environment.diagnostics_text(environment.diagnostics())
    finally:
        QApplication.restoreOverrideCursor()
    dlg = TextReportDialog("SRMF diagnostics", text, parent)
    dlg.show()
    return dlg


class InstallTask(QgsTask):
    """Creates the managed environment and installs the engine's packages (pip), with a live log."""

    line = pyqtSignal(str)

    def __init__(self, variant: str = "default", **kwargs):
        super().__init__("SRMF: installing the engine's dependencies", QgsTask.Flag.CanCancel)
        self.variant = variant
        self.kwargs = kwargs
        self.python = None
        self.error = None

    def run(self) -> bool:
        try:
            self.python = environment.install_engine(self.line.emit, self.setProgress, self.isCanceled,
                                                     variant=self.variant, **self.kwargs)
            return True
        except environment.InstallError as exc:
            self.error = str(exc)
            self.line.emit("ERROR: " + self.error)
            return False
        except Exception as exc:  # noqa: BLE001 - shown to the user, never lost
            self.error = f"{type(exc).__name__}: {exc}"
            self.line.emit("ERROR: " + self.error)
            return False


class InstallDialog(QDialog):
    """Shows the installation's progress and pip's output as it runs."""

    finished_install = pyqtSignal(bool, str)

    def __init__(self, variant: str = "default", parent=None, **kwargs):
        super().__init__(parent)
        self.setWindowTitle("SRMF \u2014 Install dependencies")
        self.resize(820, 520)
        venv = kwargs.get("venv") or runtime.managed_venv_dir()
        self.info = QLabel(f"Creating a Python environment for the SRMF engine in <b>{venv}</b> and installing "
                           "PyTorch and the other packages it needs with pip. This downloads 1\u20133 GB and can take "
                           "several minutes. QGIS stays usable meanwhile.", self)
        self.info.setWordWrap(True)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 100)
        self.log = QPlainTextEdit(self)
        self.log.setReadOnly(True)
        self.log.setFont(QFont("monospace"))
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel, self)
        self.buttons.rejected.connect(self._cancel_or_close)
        lay = QVBoxLayout(self)
        lay.addWidget(self.info)
        lay.addWidget(self.progress)
        lay.addWidget(self.log)
        lay.addWidget(self.buttons)
        self.task = InstallTask(variant, **kwargs)
        self.task.line.connect(self.log.appendPlainText)
        self.task.progressChanged.connect(lambda p: self.progress.setValue(int(p)))
        self.task.taskCompleted.connect(lambda: self._done(True))
        self.task.taskTerminated.connect(lambda: self._done(False))
        self.done = False
        self.ok = False

    def start(self):
        QgsApplication.taskManager().addTask(self.task)
        return self

    def _cancel_or_close(self):
        if not self.done:
            self.task.cancel()
        self.reject()

    def _done(self, ok: bool):
        self.done, self.ok = True, ok
        self.buttons.clear()
        self.buttons.addButton(QDialogButtonBox.StandardButton.Close)
        if ok:
            self.progress.setValue(100)
            self.log.appendPlainText(f"\nThe SRMF engine is ready: {self.task.python}")
            _MISSING_RESET()
        else:
            self.log.appendPlainText(f"\nInstallation failed: {self.task.error or 'cancelled'}")
        self.finished_install.emit(ok, self.task.error or "")


def _MISSING_RESET():  # noqa: N802
    runtime._MISSING_CACHE.clear()


class SettingsDialog(QDialog):
    """Raster ▸ SRMF ▸ Settings…"""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("SRMF settings")
        self.resize(720, 300)
        self.message_bar = QgsMessageBar(self)
        self.message_bar.setSizePolicy(QSizePolicy.Policy.Minimum, QSizePolicy.Policy.Fixed)
        self.python = QgsFileWidget(self)
        self.python.lineEdit().setPlaceholderText("automatic")
        self.python.setFilePath(str(runtime.get_setting(runtime.SETTINGS_PYTHON, "") or ""))
        self.python.fileChanged.connect(lambda *_: self.update_status())
        self.status = QLabel(self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.device = QComboBox(self)
        for key, text in DEVICES:
            self.device.addItem(text, key)
        current = str(runtime.get_setting(runtime.SETTINGS_DEVICE, "auto") or "auto")
        self.device.setCurrentIndex(max(0, self.device.findData(current)))
        self.variant = QComboBox(self)
        for key, text in environment.torch_variant_names().items():
            self.variant.addItem(text, key)
        v = str(runtime.get_setting(runtime.SETTINGS_TORCH_VARIANT, "default") or "default")
        self.variant.setCurrentIndex(max(0, self.variant.findData(v)))
        self.install_button = QPushButton("Install dependencies\u2026", self)
        self.install_button.setToolTip(f"Create {runtime.managed_venv_dir()} and pip-install the engine's packages.")
        self.diag_button = QPushButton("Diagnostics", self)
        self.diag_button.setToolTip("QGIS, Python, PyTorch and CUDA versions, GPUs found, GDAL: a report to copy.")
        self.install_button.clicked.connect(self.install)
        self.diag_button.clicked.connect(self.diagnostics)
        form = QFormLayout()
        form.addRow("Engine Python interpreter:", self.python)
        form.addRow("", self.status)
        form.addRow("Processor for one-click segmentation:", self.device)
        form.addRow("PyTorch build to install:", self.variant)
        actions = QHBoxLayout()
        actions.addWidget(self.install_button)
        actions.addWidget(self.diag_button)
        actions.addStretch(1)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.message_bar)
        lay.addLayout(form)
        lay.addLayout(actions)
        lay.addStretch(1)
        lay.addWidget(buttons)
        self.install_dialog = None
        self.report = None
        self.update_status()

    def update_status(self):
        path = (self.python.filePath() or "").strip()
        if path:
            import os

            ok = os.path.isfile(path)
            self.status.setText(("Uses this interpreter." if ok else "<b>This file does not exist.</b>") +
                                " Leave blank to choose automatically.")
            return
        try:
            interp = runtime.resolve_python(require_torch=True)
            self.status.setText(f"Automatic: {interp.path} ({interp.source}).")
        except runtime.EngineError:
            self.status.setText("Automatic: <b>no Python with PyTorch found.</b> Click \u201cInstall dependencies\u2026\u201d "
                                f"(installs into {runtime.managed_venv_dir()}) or choose an interpreter.")

    def accept(self):
        path = (self.python.filePath() or "").strip()
        if path and not environment.looks_like_python(path):
            self.message_bar.pushMessage("SRMF", f"{path} does not look like a Python executable.", Qgis.MessageLevel.Warning, 0)
            return
        runtime.set_setting(runtime.SETTINGS_PYTHON, path)
        runtime.set_setting(runtime.SETTINGS_DEVICE, self.device.currentData())
        runtime.set_setting(runtime.SETTINGS_TORCH_VARIANT, self.variant.currentData())
        super().accept()

    def install(self, **kwargs):
        runtime.set_setting(runtime.SETTINGS_TORCH_VARIANT, self.variant.currentData())
        self.install_dialog = InstallDialog(self.variant.currentData(), self, **kwargs)
        self.install_dialog.finished_install.connect(lambda ok, err: self.update_status())
        self.install_dialog.show()
        return self.install_dialog.start()

    def diagnostics(self):
        self.report = show_diagnostics(self)
        return self.report
