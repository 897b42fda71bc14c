"""Every plotly figure tracelib draws. Functions return figures and never call `.show()`.

One module per view, as CircuitsVis does: `style` (colours, captions, layout), `trace_views`,
`report`, `comparison`, `patching`, `ood`, `study`, `routes`. Plotting imports no step: a result's `.plot()` calls
down into it with tensors, labels and formats.
"""

# Labels and numbers as the figures write them (from formats), where plotting always offered them.
from tracelib.formats import READABLE_PROB, fmt_value, metric_phrase, token_labels, unit_label  # noqa: F401
from tracelib.plotting.comparison import (  # noqa: F401
    comparison_bars,
    comparison_heatmaps,
)
from tracelib.plotting.ood import (  # noqa: F401
    CORRUPTED_COLOR,
    RATIO_RANGE,
    REFERENCE_COLOR,
    STATUS_STYLE,
    damage_figure,
    undertrained_figure,
)
from tracelib.plotting.patching import (  # noqa: F401
    NOT_PATCHED_COLOR,
    NOT_PATCHED_MARK,
    NOT_PATCHED_NAME,
    PATCHING_CAPTION,
    RAW_CHANGE_CAPTION,
    RECOVERY_COLOR_LIMIT,
    _weak_title,
    agreement_figure,
    patching_figure,
    readable_causal_figure,
    recovery_color_limit,
)
from tracelib.plotting.report import (  # noqa: F401
    _prediction_line,
    readable_positions_sentence,
    report_figures,
    report_html,
)
from tracelib.plotting.routes import routes_figure  # noqa: F401
from tracelib.plotting.study import SURVIVAL_CAPTION, survival_heatmap  # noqa: F401
from tracelib.plotting.style import *  # noqa: F403 (style.__all__)
from tracelib.plotting.trace_views import (  # noqa: F401
    MARGIN_CAPTION,
    component_bars,
    head_heatmap,
    lens_lines,
    margin_bars,
    neuron_strip,
    position_heatmap,
    signed_bars,
    source_bars,
)
