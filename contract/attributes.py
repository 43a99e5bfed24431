"""OpenTelemetry attribute keys the engine writes and every reader (views, bridge, CLI) reads.

Semantic-convention names where one exists (`gen_ai.*`, `error.type`, `enduser.id`, …),
`workflow.*` only where none does (docs/telemetry.md).
"""

from __future__ import annotations

from typing import Final

# The instrumentation scope of the engine's spans, events and metrics.
SCOPE: Final = "flowscope.engine"

GEN_AI_OPERATION: Final = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_PROVIDER: Final = "gen_ai.provider.name"
GEN_AI_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
ERROR_TYPE: Final = "error.type"
ENDUSER_ID: Final = "enduser.id"

WORKFLOW_NAME: Final = "workflow.name"
WORKFLOW_ID: Final = "workflow.id"
WORKFLOW_VERSION: Final = "workflow.version"
EXECUTION_ID: Final = "workflow.execution.id"
EVENT_SEQ: Final = "workflow.event.seq"
TRIGGER_TYPE: Final = "workflow.trigger.type"
NODE_COUNT: Final = "workflow.node.count"
NODES_COMPLETED: Final = "workflow.node.completed_count"
NODES_FAILED: Final = "workflow.node.failed_count"
NODES_SKIPPED: Final = "workflow.node.skipped_count"
WORKFLOW_RESULT: Final = "workflow.result"
RESUMED_FROM: Final = "workflow.resumed_from.execution.id"
PARENT_EXECUTION_ID: Final = "workflow.parent.execution.id"
LINK_TYPE: Final = "workflow.link.type"
CHILD_EXECUTION_ID: Final = "workflow.child.execution.id"  # on a subworkflow node's attempt span
NODE_ID: Final = "workflow.node.id"
NODE_TYPE: Final = "workflow.node.type"
NODE_LABEL: Final = "workflow.node.label"
NODE_ATTEMPT: Final = "workflow.node.attempt"
NODE_RERUN: Final = "workflow.node.rerun"  # true: the node may have run before, in the run this one resumes
NODE_RESULT: Final = "workflow.node.result"
NODE_INPUT: Final = "workflow.node.input"
NODE_OUTPUT: Final = "workflow.node.output"
TIME_TO_FIRST_TOKEN: Final = "workflow.llm.time_to_first_token"
# A rollback's span and its compensations' spans (docs/telemetry.md, "Rollback"). A compensation
# names its node with its own key, not workflow.node.id: it is no attempt of the node, and the
# node_executions view must not take it for one.
ROLLBACK_ID: Final = "workflow.rollback.id"
ROLLBACK_TO_NODE: Final = "workflow.rollback.to_node"
ROLLBACK_FORCED: Final = "workflow.rollback.forced"
ROLLBACK_RESULT: Final = "workflow.rollback.result"
COMPENSATION_NODE_ID: Final = "workflow.compensation.node.id"
COMPENSATION_RESULT: Final = "workflow.compensation.result"
SIDE_EFFECT: Final = "workflow.node.side_effect"

# Values of `gen_ai.operation.name`: a run span is the one whose operation is invoke_workflow.
OPERATION_INVOKE_WORKFLOW: Final = "invoke_workflow"
OPERATION_CHAT: Final = "chat"
OPERATION_EXECUTE_TOOL: Final = "execute_tool"
# Value of `workflow.link.type` on a resumed run's link to the run it resumes.
LINK_RESUMED_FROM: Final = "resumed_from"
# … and on a rollback span's link to the run it rolls back.
LINK_ROLLBACK_OF: Final = "rollback_of"

ATTRIBUTE_KEYS: Final = frozenset(
    {
        GEN_AI_OPERATION, GEN_AI_REQUEST_MODEL, GEN_AI_PROVIDER, GEN_AI_INPUT_TOKENS, GEN_AI_OUTPUT_TOKENS,
        GEN_AI_TOKEN_TYPE, GEN_AI_TOOL_NAME, ERROR_TYPE, ENDUSER_ID, WORKFLOW_NAME, WORKFLOW_ID, WORKFLOW_VERSION,
        EXECUTION_ID, EVENT_SEQ, TRIGGER_TYPE, NODE_COUNT, NODES_COMPLETED, NODES_FAILED, NODES_SKIPPED,
        WORKFLOW_RESULT, RESUMED_FROM, PARENT_EXECUTION_ID, LINK_TYPE, CHILD_EXECUTION_ID, NODE_ID, NODE_TYPE,
        NODE_LABEL, NODE_ATTEMPT, NODE_RERUN, NODE_RESULT, NODE_INPUT, NODE_OUTPUT, TIME_TO_FIRST_TOKEN,
        ROLLBACK_ID, ROLLBACK_TO_NODE, ROLLBACK_FORCED, ROLLBACK_RESULT, COMPENSATION_NODE_ID, COMPENSATION_RESULT,
        SIDE_EFFECT,
    }
)  # fmt: skip
