//! An outbound's mark rules in raylimit's nft table: planned, replaced and deleted, each change
//! with its undo.

use super::*;

/// The nft steps of an outbound limit (`want`: its classification or its mark saving): table
/// and chain when missing, then the rule (a changed rule is deleted and added again in the same
/// atomic batch).
pub(super) fn plan_nft_rule(
    ctx: &Context,
    obs: &Observation,
    want: NftRule,
    held: &[ManagedRule],
    steps: &mut Vec<Step>,
    changes: &mut Vec<String>,
) {
    if held.len() == 1 && held[0].rule == want {
        return;
    }
    let name = match want {
        NftRule::MarkToPriority { .. } => "nft-classify-mark",
        NftRule::SaveMark { .. } => "nft-save-mark",
    };
    let state = match &obs.nft {
        Some(Ok(s)) => s.clone(),
        _ => NftState::default(),
    };
    let mut ops = Vec::new();
    let mut undo = Vec::new();
    if !state.table {
        ops.push(NftOp::AddTable);
    }
    if !state.chains.iter().any(|c| c == want.chain()) {
        ops.push(NftOp::AddChain(want.chain()));
    }
    for old in held {
        changes.push(format!(
            "the nft rule differed ({}) and is replaced",
            old.rule.describe()
        ));
        ops.push(NftOp::DeleteRule {
            chain: old.chain.clone(),
            handle: old.handle,
        });
        if let Some(tag) = &old.tag {
            undo.push(NftOp::AddRule {
                rule: old.rule.clone(),
                tag: tag.clone(),
            });
        }
    }
    let tag = Tag {
        owner: ctx.owner.clone(),
        subject: ctx.request.subject.key().to_string(),
    };
    ops.push(NftOp::AddRule {
        rule: want.clone(),
        tag: tag.clone(),
    });
    let netns = ctx.netns_path.clone();
    let mut undo_steps = vec![Step::new(
        "delete-nft-rule",
        Operation::NftRemoveTagged {
            netns: netns.clone(),
            rule: want,
            subject: tag.subject,
        },
    )];
    if !undo.is_empty() {
        undo_steps.push(Step::new(
            "restore-nft-rules",
            Operation::Nft {
                netns: netns.clone(),
                ops: undo,
            },
        ));
    }
    if !state.table {
        undo_steps.push(Step::new(
            "delete-nft-table",
            Operation::Nft {
                netns: netns.clone(),
                ops: vec![NftOp::DeleteTable],
            },
        ));
    }
    steps.push(Step::new(name, Operation::Nft { netns, ops }).undone_by(undo_steps));
}

/// The mask an fw filter compares under (all bits when it names none).
pub(super) fn fw_mask(f: &Filter) -> u32 {
    match &f.kind {
        FilterKind::Fw(fw) => fw.mask.unwrap_or(u32::MAX),
        _ => u32::MAX,
    }
}

/// Deletes the subject's nft rules; the table goes with the last rule in it. Undone by putting
/// the table, its chains and the rules back.
pub(super) fn delete_nft_rules(ctx: &Context, obs: &Observation, rules: &[ManagedRule]) -> Step {
    let mut ops: Vec<NftOp> = rules
        .iter()
        .map(|r| NftOp::DeleteRule {
            chain: r.chain.clone(),
            handle: r.handle,
        })
        .collect();
    let others = match &obs.nft {
        Some(Ok(s)) => s.rules.len() - rules.len() + s.foreign.len(),
        _ => 1,
    };
    let mut undo_ops = Vec::new();
    if others == 0 {
        ops.push(NftOp::DeleteTable);
        undo_ops.push(NftOp::AddTable);
        if let Some(Ok(s)) = &obs.nft {
            for chain in [CHAIN_CLASSIFY, CHAIN_SAVE] {
                if s.chains.iter().any(|c| c == chain) {
                    undo_ops.push(NftOp::AddChain(chain));
                }
            }
        }
    }
    undo_ops.extend(rules.iter().filter_map(|r| {
        r.tag.clone().map(|tag| NftOp::AddRule {
            rule: r.rule.clone(),
            tag,
        })
    }));
    let netns = ctx.netns_path.clone();
    Step::new(
        "delete-nft-rule",
        Operation::Nft {
            netns: netns.clone(),
            ops,
        },
    )
    .undone_by(vec![Step::new(
        "restore-nft-rule",
        Operation::Nft {
            netns,
            ops: undo_ops,
        },
    )])
}
