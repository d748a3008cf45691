//! Every state transition of the control plane, as pure decisions over typed structs: the
//! application phases, a region's health and a task's lease life cycle.
//!
//! Nothing here reads the store, the clock or the network, and nothing is async: callers gather
//! the facts (the time included), call a decision and apply what it returns (the status to
//! write, the events to record, the tasks to create, when to look again). So each decision is
//! tested as a table of facts in, decision out, and a reconciler is a thin shell around one.
//! The astro-fit stage decision is [`crate::astro_fit::next_stage`]; its planner turns what it
//! says into [`ApplicationDecision`]s with the builders below.

use std::time::Duration;

use ceccm_federation::region::{AgentStatus, Capacity};
use ceccm_federation::{RegionObservation, RegionSpec, RegionStatus};

use crate::astro_fit::{ContentRef, Stage};
use crate::objects::EventType;
use crate::resources::{
    AppKind, AppPhase, ApplicationSpec, ApplicationStatus, Condition, Progress, TaskSpec,
    TaskState, TaskStatus, TaskTemplate,
};
use crate::scheduling::{Placement, Unschedulable};
use crate::time::{format_millis, parse_millis};

/// What the runner should do with an object after reconciling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look again after this long even if nothing changes.
    Requeue(Duration),
    /// Nothing to do until the object or its tasks change.
    AwaitChange,
}

/// Phases that wait on work in flight are looked at again this often.
pub const POLL: Duration = Duration::from_secs(2);

/// An event to record about the reconciled object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventType,
    pub reason: String,
    pub message: String,
}

impl Event {
    pub fn normal(reason: &str, message: impl Into<String>) -> Self {
        Event {
            kind: EventType::Normal,
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub fn warning(reason: &str, message: impl Into<String>) -> Self {
        Event {
            kind: EventType::Warning,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Sets a condition at `now`; its transition time moves only when its status does.
pub fn set_condition_at(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
) {
    let status = if status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.condition_type == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.into();
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => conditions.push(Condition {
            condition_type: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now.into(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Applications
// ---------------------------------------------------------------------------------------------

/// What the application reconciler read of one application.
#[derive(Debug, Clone, Copy)]
pub struct ApplicationFacts<'a> {
    pub name: &'a str,
    pub spec: &'a ApplicationSpec,
    pub generation: Option<i64>,
    pub status: &'a ApplicationStatus,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// RFC 3339, for the status's times and the conditions' transition times.
    pub now: &'a str,
}

impl ApplicationFacts<'_> {
    pub fn phase(&self) -> AppPhase {
        self.status.phase.unwrap_or(AppPhase::Pending)
    }
}

/// A task to create, queued on `region`. Creating one that exists changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub spec: TaskSpec,
    pub region: String,
    /// The astro-fit stage it belongs to (labelled so).
    pub stage: Option<Stage>,
}

/// Results to publish before the status that points at them is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Publish {
    /// A container application's per-task results, in task order, as `results.ndjson`.
    TaskResults,
    /// An astro-fit application's outputs: the assemble task's artifacts.
    Artifacts(Vec<ContentRef>),
}

/// What to write for an application, in the order the shell applies it: publish results,
/// create tasks, write the status, release what it holds, record events, drop the finalizer.
/// Tasks come before the status that counts them so that a pass cut short resumes.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplicationDecision {
    /// The new status; `None`: leave it as it is.
    pub status: Option<ApplicationStatus>,
    pub events: Vec<Event>,
    pub tasks: Vec<NewTask>,
    pub publish: Option<Publish>,
    /// Delete the tasks, results and artifacts, then remove the `ceccm/release` finalizer.
    pub release: bool,
    pub action: Action,
}

impl ApplicationDecision {
    /// Nothing to write.
    pub fn nothing(action: Action) -> Self {
        ApplicationDecision {
            status: None,
            events: vec![],
            tasks: vec![],
            publish: None,
            release: false,
            action,
        }
    }

    /// Writes `status` if it differs from `before`; no event.
    pub fn update(before: &ApplicationStatus, status: ApplicationStatus, action: Action) -> Self {
        ApplicationDecision {
            status: (status != *before).then_some(status),
            ..Self::nothing(action)
        }
    }

    /// Moves to `phase` with `status`, recording `event` (every phase change records one).
    pub fn transition(
        mut status: ApplicationStatus,
        phase: AppPhase,
        event: Event,
        action: Action,
    ) -> Self {
        status.phase = Some(phase);
        ApplicationDecision {
            status: Some(status),
            events: vec![event],
            ..Self::nothing(action)
        }
    }

    pub fn with_tasks(self, tasks: Vec<NewTask>) -> Self {
        ApplicationDecision { tasks, ..self }
    }

    pub fn with_publish(self, publish: Publish) -> Self {
        ApplicationDecision {
            publish: Some(publish),
            ..self
        }
    }
}

/// What the application reconciler does next. Some phases need more facts than the object
/// holds: the shell gathers them and hands them to the matching decision.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplicationStep {
    /// Apply this and stop.
    Apply(Box<ApplicationDecision>),
    /// Scheduling a container application: price a placement of `tasks` tasks with
    /// `scheduling::place`, then [`container_placed`] decides.
    Place { tasks: usize },
    /// Running a container application: tally its tasks, then [`container_running`] decides.
    TallyTasks,
    /// The astro-fit planner (`reconcile::astro_fit`) takes this phase, `Scheduling` (pin the
    /// inputs, place the prepare task) or `Running` (the next stage, by `next_stage`).
    AstroFit(AppPhase),
}

/// The application phase machine: `Pending -> Scheduling -> Running -> Succeeded | Failed`,
/// `Suspended` while `spec.suspend`, `Deleting` once deleted; `Cancelled` by a user.
pub fn decide_application(f: &ApplicationFacts) -> ApplicationStep {
    use AppPhase::*;
    if f.deleting {
        return apply(release(f));
    }
    match (f.phase(), f.spec.suspend) {
        (Succeeded | Failed | Cancelled, _) => {
            apply(ApplicationDecision::nothing(Action::AwaitChange))
        }
        (Suspended, true) => apply(ApplicationDecision::nothing(Action::AwaitChange)),
        (Pending | Scheduling | Running | Deleting, true) => {
            let mut next = f.status.clone();
            set_condition_at(
                &mut next.conditions,
                "Suspended",
                true,
                "SpecSuspend",
                "spec.suspend is true",
                f.now,
            );
            apply(ApplicationDecision::transition(
                next,
                Suspended,
                Event::normal("Suspended", "queued tasks are held"),
                Action::AwaitChange,
            ))
        }
        (Suspended, false) => {
            let mut next = f.status.clone();
            set_condition_at(
                &mut next.conditions,
                "Suspended",
                false,
                "Resumed",
                "spec.suspend is false",
                f.now,
            );
            // Scheduled work carries on; unscheduled work goes back to scheduling.
            let resume_to = if f.status.placements.is_empty() {
                Pending
            } else {
                Running
            };
            apply(ApplicationDecision::transition(
                next,
                resume_to,
                Event::normal("Resumed", "spec.suspend is false"),
                Action::Requeue(Duration::ZERO),
            ))
        }
        (Pending, false) => {
            let mut next = f.status.clone();
            next.observed_generation = f.generation;
            apply(ApplicationDecision::transition(
                next,
                Scheduling,
                Event::normal("Scheduling", "placing tasks on regions"),
                Action::Requeue(Duration::ZERO),
            ))
        }
        (Scheduling, false) => match f.spec.app {
            AppKind::Container => ApplicationStep::Place {
                tasks: f.spec.tasks.len(),
            },
            AppKind::AstroFit => ApplicationStep::AstroFit(Scheduling),
        },
        (Running, false) => match f.spec.app {
            AppKind::Container => ApplicationStep::TallyTasks,
            AppKind::AstroFit => ApplicationStep::AstroFit(Running),
        },
        // Only a deletion leads here, and it is handled above.
        (Deleting, false) => apply(ApplicationDecision::nothing(Action::AwaitChange)),
    }
}

fn apply(decision: ApplicationDecision) -> ApplicationStep {
    ApplicationStep::Apply(Box::new(decision))
}

/// A deleted application: its tasks, results and artifacts go, then its finalizer.
fn release(f: &ApplicationFacts) -> ApplicationDecision {
    // DELETE has normally set the phase already.
    let status = (f.status.phase != Some(AppPhase::Deleting)).then(|| ApplicationStatus {
        phase: Some(AppPhase::Deleting),
        ..f.status.clone()
    });
    ApplicationDecision {
        status,
        events: vec![Event::normal(
            "Released",
            "tasks and results released; the application goes away",
        )],
        release: true,
        ..ApplicationDecision::nothing(Action::AwaitChange)
    }
}

/// Nothing fits now: the `Scheduled` condition says why, with one Warning event when the
/// reason changes (not on every pass), and the placement is tried again.
pub fn unschedulable(
    status: &ApplicationStatus,
    why: &Unschedulable,
    now: &str,
) -> ApplicationDecision {
    let message = why.reasons.join("; ");
    let mut next = status.clone();
    set_condition_at(
        &mut next.conditions,
        "Scheduled",
        false,
        "Unschedulable",
        &message,
        now,
    );
    if next == *status {
        return ApplicationDecision::nothing(Action::Requeue(POLL));
    }
    ApplicationDecision {
        status: Some(next),
        events: vec![Event::warning("Unschedulable", message)],
        ..ApplicationDecision::nothing(Action::Requeue(POLL))
    }
}

/// The application fails with `reason`: terminal, with the cause in the `Complete` condition.
pub fn fail(
    status: &ApplicationStatus,
    reason: &str,
    message: &str,
    now: &str,
) -> ApplicationDecision {
    let mut next = status.clone();
    next.completion_time = Some(now.into());
    set_condition_at(
        &mut next.conditions,
        "Complete",
        false,
        reason,
        message,
        now,
    );
    ApplicationDecision::transition(
        next,
        AppPhase::Failed,
        Event::warning(reason, message),
        Action::AwaitChange,
    )
}

/// The application succeeds: `publish` first, then the status points at the results.
/// `complete` is the `Complete` condition's (reason, message); `message` the event's.
pub fn succeed(
    f: &ApplicationFacts,
    status: ApplicationStatus,
    complete: (&str, &str),
    message: &str,
    publish: Publish,
) -> ApplicationDecision {
    let mut next = status;
    next.results = Some(format!("/api/v1/applications/{}/results", f.name));
    next.completion_time = Some(f.now.into());
    set_condition_at(
        &mut next.conditions,
        "Complete",
        true,
        complete.0,
        complete.1,
        f.now,
    );
    ApplicationDecision::transition(
        next,
        AppPhase::Succeeded,
        Event::normal("Succeeded", message),
        Action::AwaitChange,
    )
    .with_publish(publish)
}

/// Placed: the tasks are created on their regions and the application runs. `status` is the
/// caller's, with whatever else it records (stages, placements) already set.
pub fn scheduled(
    f: &ApplicationFacts,
    mut status: ApplicationStatus,
    placement: &Placement,
    tasks: Vec<NewTask>,
    summary: &str,
) -> ApplicationDecision {
    status.explanation = Some(placement.explanation.clone());
    status.start_time = Some(f.now.into());
    set_condition_at(
        &mut status.conditions,
        "Scheduled",
        true,
        "Scheduled",
        &placement.explanation,
        f.now,
    );
    ApplicationDecision::transition(
        status,
        AppPhase::Running,
        Event::normal("Scheduled", summary),
        Action::Requeue(Duration::ZERO),
    )
    .with_tasks(tasks)
}

/// The name of task `index` of `application`.
pub fn task_name(application: &str, index: u32) -> String {
    format!("{application}-{index:05}")
}

/// The spec of a container application's task `index`.
fn command_task(f: &ApplicationFacts, index: u32, template: &TaskTemplate) -> TaskSpec {
    TaskSpec {
        application: f.name.into(),
        index,
        command: template.command.clone(),
        args: template.args.clone(),
        env: template.env.clone(),
        astro_fit: None,
        features: None,
        cores: Some(f.spec.resources.cpu).filter(|c| *c > 0.0),
        max_attempts: f.spec.max_attempts,
        image: f.spec.task_image(),
        memory_mib: f.spec.task_memory_mib(),
        active_deadline_seconds: f.spec.task_deadline_seconds,
    }
}

/// Scheduling a container application, once placement answered: one task per template on the
/// region placement chose, or the reason nothing fits.
pub fn container_placed(
    f: &ApplicationFacts,
    placed: Result<Placement, Unschedulable>,
) -> ApplicationDecision {
    let placement = match placed {
        Ok(p) => p,
        Err(why) => return unschedulable(f.status, &why, f.now),
    };
    let tasks = f
        .spec
        .tasks
        .iter()
        .zip(&placement.assignment)
        .enumerate()
        .map(|(index, (template, region))| NewTask {
            spec: command_task(f, index as u32, template),
            region: region.clone(),
            stage: None,
        })
        .collect();
    let mut status = f.status.clone();
    status.placements = placement.placements.clone();
    status.progress = Progress {
        done: 0,
        failed: 0,
        total: f.spec.tasks.len() as u32,
    };
    let summary: Vec<String> = status
        .placements
        .iter()
        .map(|p| format!("{} tasks on {}", p.tasks, p.region))
        .collect();
    scheduled(f, status, &placement, tasks, &summary.join(", "))
}

/// A container application's tasks, as the Running phase sees them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskTally {
    /// Tasks that exist (fewer than planned while a pass cut short is resumed).
    pub total: u32,
    pub done: u32,
    /// Names of the tasks dead-lettered after their last attempt.
    pub dead_lettered: Vec<String>,
    pub energy_joules: f64,
}

impl TaskTally {
    /// Counts one task.
    pub fn add(&mut self, name: &str, state: Option<TaskState>, energy_joules: f64) {
        self.total += 1;
        self.energy_joules += energy_joules;
        match state {
            Some(TaskState::Done) => self.done += 1,
            Some(TaskState::DeadLettered) => self.dead_lettered.push(name.into()),
            _ => {}
        }
    }
}

/// Running a container application: `Failed` as soon as one task is dead-lettered,
/// `Succeeded` once every planned task is done, else the progress is written and it waits.
pub fn container_running(f: &ApplicationFacts, tally: &TaskTally) -> ApplicationDecision {
    let expected = f.status.progress.total;
    let mut status = f.status.clone();
    status.progress = Progress {
        done: tally.done,
        failed: tally.dead_lettered.len() as u32,
        total: expected,
    };
    status.energy_joules = tally.energy_joules;
    if !tally.dead_lettered.is_empty() {
        let message = format!(
            "tasks dead-lettered after their last attempt: {}",
            tally.dead_lettered.join(", ")
        );
        return fail(&status, "TaskDeadLettered", &message, f.now);
    }
    if tally.total >= expected && tally.done == expected {
        let done = format!("{} tasks done", tally.done);
        let message = format!("{done}, {:.1} J", tally.energy_joules);
        return succeed(
            f,
            status,
            ("AllTasksDone", &done),
            &message,
            Publish::TaskResults,
        );
    }
    ApplicationDecision::update(f.status, status, Action::Requeue(POLL))
}

// ---------------------------------------------------------------------------------------------
// Regions
// ---------------------------------------------------------------------------------------------

/// A region's tasks the driver must serve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionTasks {
    pub queued: u32,
    pub leased: u32,
    /// The most cores one of them uses (1 when none says).
    pub cores_per_task: f64,
}

impl Default for RegionTasks {
    fn default() -> Self {
        RegionTasks {
            queued: 0,
            leased: 0,
            cores_per_task: 1.0,
        }
    }
}

/// What the region reconciler does with the driver before deciding the region's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionStep {
    /// Deleted: stop its workers and remove the `ceccm/release` finalizer.
    Release,
    /// Ask the driver for this many workers; [`decide_region`] then reads what it saw.
    Ensure { workers: u32 },
}

/// Predicted seconds to drain a region's queue that its worker pool is sized for.
pub const AUTOSCALE_TARGET_QUEUE_SECONDS: f64 = 60.0;

/// What the autoscaler reads about a region's pool besides its task counts.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolFacts {
    /// The region as the scheduler sees it (speed, capacity, load): what the predictor prices.
    pub region: ceccm_scheduler::RegionSnapshot,
    /// The queued tasks grouped by application and features, with how many wait in each group.
    pub queued: Vec<(ceccm_scheduler::TaskGroup, u64)>,
    /// Workers up now (the driver's or the agent's last count).
    pub workers: u32,
}

/// The workers a region runs: none once deleted; otherwise one for each leased task, plus the
/// workers `ceccm_scheduler::autoscale::desired_workers` wants for the queue (the fewest that
/// drain its predicted work within [`AUTOSCALE_TARGET_QUEUE_SECONDS`], priced by `model`), at
/// least one while anything is queued, never more than there are tasks or than the region's
/// cores hold at the cores each task uses (at least one), and none when nothing is queued or
/// leased. Drivers only ever start workers (idle ones leave by themselves), so a smaller answer
/// than the workers up starts none and the pool shrinks as workers fall idle.
pub fn region_step(
    deleting: bool,
    capacity_cpu: u32,
    tasks: RegionTasks,
    pool: &PoolFacts,
    model: &impl ceccm_scheduler::CostModel,
) -> RegionStep {
    if deleting {
        return RegionStep::Release;
    }
    let cores_per_task = tasks.cores_per_task.max(1.0);
    let fit = ((f64::from(capacity_cpu) / cores_per_task).floor() as u32).max(1);
    let all = tasks.queued.saturating_add(tasks.leased);
    if all == 0 {
        return RegionStep::Ensure { workers: 0 };
    }
    let busy = tasks.leased.min(fit);
    let policy = ceccm_scheduler::autoscale::AutoscalePolicy {
        target_queue_seconds: AUTOSCALE_TARGET_QUEUE_SECONDS,
        min_workers: 0,
        max_workers: u64::from(fit - busy),
        // A worker runs one task at a time on the cores that task uses.
        worker: ceccm_scheduler::Resources::new(cores_per_task, 0, 0),
    };
    let queued: Vec<(&ceccm_scheduler::TaskGroup, u64)> =
        pool.queued.iter().map(|(g, n)| (g, *n)).collect();
    let idle_now = u64::from(pool.workers.saturating_sub(tasks.leased));
    let for_queue = ceccm_scheduler::autoscale::desired_workers(
        &pool.region,
        &queued,
        idle_now,
        &policy,
        model,
    )
    .workers
    .min(u64::from(fit - busy)) as u32;
    let for_queue = if tasks.queued > 0 {
        for_queue.clamp(1, tasks.queued)
    } else {
        0
    };
    RegionStep::Ensure {
        workers: (busy + for_queue).min(fit).min(all),
    }
}

/// A region's status is rewritten at least this often even when nothing else changed, so a
/// silent control plane shows as a stale heartbeat.
pub const REGION_HEARTBEAT_MS: i64 = 10_000;

/// What the region reconciler read and what the driver saw.
#[derive(Debug, Clone)]
pub struct RegionFacts<'a> {
    pub spec: &'a RegionSpec,
    pub status: &'a RegionStatus,
    pub tasks: RegionTasks,
    /// The driver's observation, or why it could not run the region.
    pub observed: Result<RegionObservation, String>,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegionDecision {
    /// The new status; `None`: leave it as it is.
    pub status: Option<RegionStatus>,
    /// Recorded when the region turns Ready or NotReady.
    pub event: Option<Event>,
    pub action: Action,
}

/// A region's health, load, power and energy from the driver's observation and its tasks.
pub fn decide_region(f: &RegionFacts) -> RegionDecision {
    let old = f.status;
    let leased = f.tasks.leased;
    let cpu = f.spec.capacity.cpu.max(1);
    let busy = f64::from(leased.min(cpu));
    let mut new = RegionStatus {
        allocatable: Some(Capacity {
            cpu: f.spec.capacity.cpu.saturating_sub(leased),
            ..f.spec.capacity.clone()
        }),
        load: busy / f64::from(cpu),
        power_watts: f.spec.energy.power_watts(busy),
        ..old.clone()
    };
    match &f.observed {
        Ok(seen) => {
            new.phase = Some(if seen.healthy { "Ready" } else { "NotReady" }.into());
            new.message = (!seen.message.is_empty()).then(|| seen.message.clone());
            new.workers = seen.workers;
            // The driver's counter restarts with the process; the region's energy only grows.
            new.cpu_seconds = seen.cpu_seconds.max(old.cpu_seconds);
            new.energy_joules = f.spec.energy.work_joules(new.cpu_seconds);
        }
        Err(message) => {
            new.phase = Some("NotReady".into());
            new.message = Some(message.clone());
            new.workers = 0;
        }
    }
    let ready = new.phase.as_deref() == Some("Ready");
    let (reason, message) = if ready {
        ("RegionReady", format!("{} workers", new.workers))
    } else {
        ("RegionNotReady", new.message.clone().unwrap_or_default())
    };
    set_condition_at(
        &mut new.conditions,
        "Ready",
        ready,
        reason,
        &message,
        &format_millis(f.now_ms),
    );
    let stale = old
        .heartbeat_time
        .as_deref()
        .and_then(parse_millis)
        .is_none_or(|t| f.now_ms - t >= REGION_HEARTBEAT_MS);
    let event = (new.phase != old.phase).then(|| {
        let message = new
            .message
            .clone()
            .unwrap_or_else(|| format!("{} workers", new.workers));
        match new.phase.as_deref() {
            Some("Ready") => Event::normal("Ready", message),
            _ => Event::warning("NotReady", message),
        }
    });
    let status = (new != *old || stale).then(|| RegionStatus {
        heartbeat_time: Some(format_millis(f.now_ms)),
        ..new
    });
    RegionDecision {
        status,
        event,
        action: Action::Requeue(Duration::from_secs(1)),
    }
}

/// What the control plane knows of an agent region from its agent's last heartbeat: healthy
/// while the agent was heard from within `grace_ms` (Kubernetes' node-monitor grace period).
pub fn agent_observation(
    agent: Option<&AgentStatus>,
    now_ms: i64,
    grace_ms: i64,
) -> Result<RegionObservation, String> {
    let Some(agent) = agent else {
        return Err("no agent has joined this region (ceccm agent --region NAME)".into());
    };
    let heard = parse_millis(&agent.heartbeat_time).unwrap_or(i64::MIN);
    let silent_ms = now_ms.saturating_sub(heard);
    if silent_ms > grace_ms {
        return Err(format!(
            "agent {} not heard from for {} s (grace {} s)",
            agent.name,
            silent_ms / 1000,
            grace_ms / 1000
        ));
    }
    Ok(RegionObservation {
        healthy: true,
        message: String::new(),
        workers: agent.workers,
        cpu_seconds: agent.cpu_seconds,
    })
}

/// A gap between an agent's heartbeats longer than this is a reconnection.
pub const AGENT_RECONNECT_GAP_MS: i64 = 10_000;
/// After an agent reconnects, its workers have this long to renew the leases they held.
pub const RECONNECT_GRACE_MS: i64 = 30_000;

/// When an agent heard at `now_ms` has been connected since, given its previous report.
pub fn connected_since(previous: Option<&AgentStatus>, now_ms: i64) -> i64 {
    let Some(previous) = previous else {
        return now_ms;
    };
    let heard = parse_millis(&previous.heartbeat_time).unwrap_or(i64::MIN);
    if now_ms.saturating_sub(heard) > AGENT_RECONNECT_GAP_MS {
        return now_ms;
    }
    previous
        .connected_since
        .as_deref()
        .and_then(parse_millis)
        .unwrap_or(heard)
}

/// Whether a lease past `deadline_ms` means its worker failed. On this host (no agent) it does.
/// In an agent's region only if the agent was connected when the lease ran out, or has been
/// back long enough for its workers to renew: otherwise the link (or the host) is what failed,
/// and the region's NotReady toleration decides, as Kubernetes leaves the pods of an
/// unreachable node to the node lifecycle controller. An edge cut off keeps its work.
pub fn worker_lost_lease(deadline_ms: i64, agent: Option<&AgentStatus>, now_ms: i64) -> bool {
    let Some(agent) = agent else {
        return true;
    };
    let heard = parse_millis(&agent.heartbeat_time).unwrap_or(i64::MIN);
    let since = agent
        .connected_since
        .as_deref()
        .and_then(parse_millis)
        .unwrap_or(heard);
    heard >= deadline_ms && (since <= deadline_ms || now_ms - since >= RECONNECT_GRACE_MS)
}

/// Since when (Unix ms) the region has been not Ready, from its `Ready` condition.
pub fn not_ready_since(status: &RegionStatus) -> Option<i64> {
    status
        .conditions
        .iter()
        .find(|c| c.condition_type == "Ready" && c.status != "True")
        .and_then(|c| parse_millis(&c.last_transition_time))
}

/// Why a task must leave a region that has been NotReady since `not_ready_since_ms`, or `None`
/// while the application tolerates it (`toleration_seconds`; `None`: for ever), as Kubernetes'
/// taint manager evicts pods from a `not-ready:NoExecute` node.
pub fn eviction_reason(
    region: &str,
    not_ready_since_ms: i64,
    toleration_seconds: Option<u64>,
    now_ms: i64,
) -> Option<String> {
    let tolerated = toleration_seconds?;
    let down_ms = now_ms.saturating_sub(not_ready_since_ms);
    (down_ms >= (tolerated as i64).saturating_mul(1000)).then(|| {
        format!(
            "region {region} NotReady for {} s, beyond the application's toleration of {tolerated} s",
            down_ms / 1000
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Tasks: `Queued -> Leased(worker, deadline) -> Done | Failed (attempts < max -> Queued) |
// DeadLettered`; a cancel withdraws leases, a retry requeues the dead-lettered.
// ---------------------------------------------------------------------------------------------

/// Why a task transition was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotQueued,
    LeaseLost { holder: Option<String> },
    Finished(TaskState),
}

/// The status of a task that was never leased.
pub fn queued_status() -> TaskStatus {
    TaskStatus {
        state: TaskState::Queued,
        attempts: 0,
        region: None,
        worker: None,
        lease_deadline: None,
        start_time: None,
        start_load: None,
        lease_secret_sha256: None,
        completion_time: None,
        cpu_seconds: 0.0,
        energy_joules: 0.0,
        result: None,
        artifacts: Vec::new(),
        error: None,
        reason: None,
        evicted: None,
    }
}

pub fn on_lease(
    status: &TaskStatus,
    worker: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<TaskStatus, Refusal> {
    if status.state != TaskState::Queued {
        return Err(Refusal::NotQueued);
    }
    Ok(TaskStatus {
        state: TaskState::Leased,
        attempts: status.attempts + 1,
        worker: Some(worker.to_string()),
        lease_deadline: Some(format_millis(now_ms + lease_ms)),
        start_time: Some(format_millis(now_ms)),
        error: None,
        ..status.clone()
    })
}

/// Whether `worker` holds the task's lease.
pub fn held_by(status: &TaskStatus, worker: &str) -> Result<(), Refusal> {
    match status.state {
        TaskState::Leased if status.worker.as_deref() == Some(worker) => Ok(()),
        TaskState::Done | TaskState::DeadLettered => Err(Refusal::Finished(status.state)),
        _ => Err(Refusal::LeaseLost {
            holder: status.worker.clone(),
        }),
    }
}

pub fn on_heartbeat(
    status: &TaskStatus,
    worker: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<TaskStatus, Refusal> {
    held_by(status, worker)?;
    Ok(TaskStatus {
        lease_deadline: Some(format_millis(now_ms + lease_ms)),
        ..status.clone()
    })
}

/// What a worker reports with a completion, besides its result: the result is opaque to the
/// life cycle, so `queue::complete` stores it beside the status this decides.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    pub artifacts: Vec<ContentRef>,
    pub cpu_seconds: f64,
    pub joules: f64,
}

/// The first completion wins, whoever holds the lease now: the work is done and its result is
/// as good as any later one. A finished task refuses.
pub fn on_complete(
    status: &TaskStatus,
    worker: &str,
    outcome: Outcome,
    now_ms: i64,
) -> Result<TaskStatus, Refusal> {
    if matches!(status.state, TaskState::Done | TaskState::DeadLettered) {
        return Err(Refusal::Finished(status.state));
    }
    Ok(TaskStatus {
        state: TaskState::Done,
        worker: Some(worker.to_string()),
        lease_deadline: None,
        completion_time: Some(format_millis(now_ms)),
        cpu_seconds: status.cpu_seconds + outcome.cpu_seconds,
        energy_joules: status.energy_joules + outcome.joules,
        artifacts: outcome.artifacts,
        error: None,
        ..status.clone()
    })
}

/// A failed attempt (reported, or a lease that expired): back to the queue while attempts
/// remain, else dead-lettered.
pub fn on_attempt_failed(
    status: &TaskStatus,
    max_attempts: u32,
    error: String,
    cpu_seconds: f64,
    joules: f64,
) -> TaskStatus {
    let state = if status.attempts >= max_attempts {
        TaskState::DeadLettered
    } else {
        TaskState::Queued
    };
    TaskStatus {
        state,
        worker: None,
        lease_deadline: None,
        cpu_seconds: status.cpu_seconds + cpu_seconds,
        energy_joules: status.energy_joules + joules,
        error: Some(error),
        ..status.clone()
    }
}

/// Error text kept from a worker's failure report.
pub const MAX_ERROR_CHARS: usize = 4096;

/// A failure reported by the lease holder. A permanent one (bad input: another attempt would
/// fail the same way) dead-letters the task now.
pub fn on_fail(
    status: &TaskStatus,
    worker: &str,
    max_attempts: u32,
    permanent: bool,
    error: &str,
    cpu_seconds: f64,
    joules: f64,
) -> Result<TaskStatus, Refusal> {
    held_by(status, worker)?;
    let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
    let max_attempts = if permanent {
        status.attempts
    } else {
        max_attempts
    };
    Ok(on_attempt_failed(
        status,
        max_attempts,
        error,
        cpu_seconds,
        joules,
    ))
}

/// A lease past its deadline at `now_ms` counts as a failed attempt; `None` when the task is
/// not leased or a heartbeat extended it.
pub fn on_lease_expired(status: &TaskStatus, max_attempts: u32, now_ms: i64) -> Option<TaskStatus> {
    let deadline = status.lease_deadline.as_deref().and_then(parse_millis);
    if status.state != TaskState::Leased || deadline.is_none_or(|d| d >= now_ms) {
        return None;
    }
    let error = format!(
        "lease of worker {} expired",
        status.worker.as_deref().unwrap_or("?")
    );
    let failed = on_attempt_failed(status, max_attempts, error, 0.0, 0.0);
    // The worker, its host or its region may be what failed: place the next attempt anew
    // instead of pinning it to the region that lost it.
    Some(match failed.state {
        TaskState::Queued => TaskStatus {
            region: None,
            lease_secret_sha256: None,
            ..failed
        },
        _ => failed,
    })
}

/// A task taken off its region (`why`): queued again with no region, for the application
/// reconciler to place anew. The attempt it was running is given back: an eviction is not the
/// task's fault. `None` when the task has finished.
pub fn on_evicted(status: &TaskStatus, why: &str) -> Option<TaskStatus> {
    let attempts = match status.state {
        TaskState::Queued => status.attempts,
        TaskState::Leased => status.attempts.saturating_sub(1),
        TaskState::Done | TaskState::Failed | TaskState::DeadLettered => return None,
    };
    Some(TaskStatus {
        state: TaskState::Queued,
        attempts,
        region: None,
        worker: None,
        lease_deadline: None,
        start_time: None,
        start_load: None,
        lease_secret_sha256: None,
        evicted: Some(why.to_string()),
        ..status.clone()
    })
}

/// The event about a task whose lease expired, by what became of it.
pub fn lease_expired_event(status: &TaskStatus) -> Event {
    let reason = if status.state == TaskState::DeadLettered {
        "DeadLettered"
    } else {
        "LeaseExpired"
    };
    Event::warning(reason, status.error.clone().unwrap_or_default())
}

/// Whether an application in `phase` can be cancelled.
pub fn can_cancel(phase: AppPhase) -> Result<(), String> {
    match phase {
        AppPhase::Pending | AppPhase::Scheduling | AppPhase::Running | AppPhase::Suspended => {
            Ok(())
        }
        AppPhase::Succeeded | AppPhase::Failed | AppPhase::Cancelled | AppPhase::Deleting => Err(
            format!("the application is {phase:?}: there is nothing to cancel"),
        ),
    }
}

/// Whether an application in `phase` can be retried.
pub fn can_retry(phase: AppPhase) -> Result<(), String> {
    match phase {
        AppPhase::Failed | AppPhase::Cancelled => Ok(()),
        other => Err(format!(
            "the application is {other:?}: only Failed or Cancelled applications are retried"
        )),
    }
}

/// A cancelled application's status: terminal until retried; finished tasks are kept.
pub fn cancelled(status: &mut ApplicationStatus, now: &str) {
    status.phase = Some(AppPhase::Cancelled);
    status.completion_time = Some(now.into());
    set_condition_at(
        &mut status.conditions,
        "Complete",
        false,
        "Cancelled",
        "cancelled by a user; finished tasks are kept",
        now,
    );
}

/// A retried application's status: work that was placed carries on; an application that
/// failed before placing any plans again.
pub fn retried(status: &mut ApplicationStatus, has_tasks: bool) {
    status.phase = Some(if has_tasks {
        AppPhase::Running
    } else {
        AppPhase::Pending
    });
    status.completion_time = None;
    status.conditions.retain(|c| c.condition_type != "Complete");
}

/// A task of a cancelled application: a lease is withdrawn (its worker's next heartbeat is
/// refused, so it stops); queued and finished tasks stay as they are.
pub fn cancelled_task(status: &TaskStatus) -> Option<TaskStatus> {
    (status.state == TaskState::Leased).then(|| TaskStatus {
        state: TaskState::Queued,
        worker: None,
        lease_deadline: None,
        error: Some("cancelled".into()),
        ..status.clone()
    })
}

/// A task of a retried application: a dead-lettered one is queued with fresh attempts.
pub fn retried_task(status: &TaskStatus) -> Option<TaskStatus> {
    (status.state == TaskState::DeadLettered).then(|| TaskStatus {
        state: TaskState::Queued,
        attempts: 0,
        worker: None,
        lease_deadline: None,
        ..status.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-01-02T03:04:05.000Z";
    const NOW_MS: i64 = 1_767_323_045_000;

    fn spec(app: AppKind, tasks: usize, suspend: bool) -> ApplicationSpec {
        let mut spec: ApplicationSpec = serde_json::from_str(
            r#"{"app": "container", "tasks": [], "resources": {"cpu": 1.0}, "maxAttempts": 3}"#,
        )
        .unwrap();
        spec.app = app;
        spec.tasks = (0..tasks)
            .map(|i| TaskTemplate {
                command: "echo".into(),
                args: vec![i.to_string()],
                env: Default::default(),
            })
            .collect();
        spec.suspend = suspend;
        spec
    }

    fn status(phase: Option<AppPhase>) -> ApplicationStatus {
        ApplicationStatus {
            phase,
            ..Default::default()
        }
    }

    fn facts<'a>(
        spec: &'a ApplicationSpec,
        status: &'a ApplicationStatus,
        deleting: bool,
    ) -> ApplicationFacts<'a> {
        ApplicationFacts {
            name: "job",
            spec,
            generation: Some(4),
            status,
            deleting,
            now: NOW,
        }
    }

    fn applied(step: ApplicationStep) -> ApplicationDecision {
        match step {
            ApplicationStep::Apply(d) => *d,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    fn phase_of(d: &ApplicationDecision) -> Option<AppPhase> {
        d.status.as_ref().and_then(|s| s.phase)
    }

    fn reasons(d: &ApplicationDecision) -> Vec<(EventType, &str)> {
        d.events
            .iter()
            .map(|e| (e.kind, e.reason.as_str()))
            .collect()
    }

    fn condition<'a>(s: &'a ApplicationStatus, kind: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.condition_type == kind)
            .unwrap_or_else(|| panic!("no {kind} condition"))
    }

    /// (app kind, phase, spec.suspend, deleting) -> (next phase, or `None`: no status write;
    /// the event's reason; the action).
    type PhaseCase = (
        (AppKind, Option<AppPhase>, bool, bool),
        (Option<AppPhase>, Option<&'static str>, Action),
    );

    #[test]
    fn every_phase_has_its_next_step() {
        use AppPhase::*;
        use ApplicationStep::*;
        const C: AppKind = AppKind::Container;
        const A: AppKind = AppKind::AstroFit;
        const NOW: Action = Action::Requeue(Duration::ZERO);
        const WAIT: Action = Action::AwaitChange;
        #[rustfmt::skip]
        let cases: [PhaseCase; 13] = [
            ((C, None, false, false), (Some(Scheduling), Some("Scheduling"), NOW)),
            ((C, Some(Pending), false, false), (Some(Scheduling), Some("Scheduling"), NOW)),
            ((C, Some(Running), true, false), (Some(Suspended), Some("Suspended"), WAIT)),
            ((A, Some(Scheduling), true, false), (Some(Suspended), Some("Suspended"), WAIT)),
            ((C, Some(Suspended), true, false), (None, None, WAIT)),
            ((C, Some(Suspended), false, false), (Some(Pending), Some("Resumed"), NOW)),
            ((C, Some(Succeeded), false, false), (None, None, WAIT)),
            ((C, Some(Failed), true, false), (None, None, WAIT)),
            // A user's cancel is final until a retry, suspended or not.
            ((C, Some(Cancelled), false, false), (None, None, WAIT)),
            ((C, Some(Cancelled), true, false), (None, None, WAIT)),
            ((C, Some(Running), false, true), (Some(Deleting), Some("Released"), WAIT)),
            ((A, Some(Succeeded), false, true), (Some(Deleting), Some("Released"), WAIT)),
            ((C, Some(Deleting), false, true), (None, Some("Released"), WAIT)),
        ];
        for ((kind, phase, suspend, deleting), (next, event, action)) in cases {
            let spec = spec(kind, 2, suspend);
            let current = status(phase);
            let d = applied(decide_application(&facts(&spec, &current, deleting)));
            let case = format!("{kind:?} {phase:?} suspend={suspend} deleting={deleting}");
            assert_eq!(phase_of(&d), next, "{case}");
            let got: Vec<&str> = d.events.iter().map(|e| e.reason.as_str()).collect();
            assert_eq!(got, Vec::from_iter(event), "{case}");
            assert!(
                d.events.iter().all(|e| e.kind == EventType::Normal),
                "{case}"
            );
            assert_eq!(d.action, action, "{case}");
            assert_eq!(d.release, deleting, "{case}");
            assert!(d.tasks.is_empty(), "{case}");
        }
        // The phases that need more facts say which.
        let step = |kind, phase| {
            let spec = spec(kind, 3, false);
            let current = status(Some(phase));
            decide_application(&facts(&spec, &current, false))
        };
        assert_eq!(step(AppKind::Container, Scheduling), Place { tasks: 3 });
        assert_eq!(step(AppKind::Container, Running), TallyTasks);
        assert_eq!(step(AppKind::AstroFit, Scheduling), AstroFit(Scheduling));
        assert_eq!(step(AppKind::AstroFit, Running), AstroFit(Running));
    }

    #[test]
    fn pending_records_the_generation_and_suspend_a_condition() {
        let spec = spec(AppKind::Container, 1, false);
        let current = status(Some(AppPhase::Pending));
        let d = applied(decide_application(&facts(&spec, &current, false)));
        assert_eq!(d.status.unwrap().observed_generation, Some(4));

        let suspended_spec = self::spec(AppKind::Container, 1, true);
        let d = applied(decide_application(&facts(&suspended_spec, &current, false)));
        let s = d.status.unwrap();
        let c = condition(&s, "Suspended");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "SpecSuspend")
        );
        assert_eq!(c.last_transition_time, NOW);
    }

    #[test]
    fn a_resumed_application_goes_back_where_its_work_is() {
        let spec = spec(AppKind::Container, 1, false);
        let mut placed = status(Some(AppPhase::Suspended));
        placed.placements = vec![crate::resources::PlacementStatus {
            region: "edge-a".into(),
            tasks: 1,
            predicted_seconds: None,
            predicted_joules: None,
        }];
        let d = applied(decide_application(&facts(&spec, &placed, false)));
        assert_eq!(phase_of(&d), Some(AppPhase::Running));
        assert_eq!(
            condition(d.status.as_ref().unwrap(), "Suspended").status,
            "False"
        );
    }

    #[test]
    fn a_deleted_application_releases_then_drops_its_finalizer() {
        let spec = spec(AppKind::Container, 1, false);
        // DELETE set the phase already: nothing to write but the release and its event.
        let deleting = status(Some(AppPhase::Deleting));
        let d = applied(decide_application(&facts(&spec, &deleting, true)));
        assert_eq!(d.status, None);
        assert!(d.release);
        assert_eq!(reasons(&d), vec![(EventType::Normal, "Released")]);
        assert_eq!(d.action, Action::AwaitChange);
    }

    fn placement(regions: &[&str]) -> Placement {
        Placement {
            placements: vec![crate::resources::PlacementStatus {
                region: regions[0].into(),
                tasks: regions.len() as u32,
                predicted_seconds: Some(1.0),
                predicted_joules: None,
            }],
            assignment: regions.iter().map(|r| r.to_string()).collect(),
            explanation: format!("{} is cheapest", regions[0]),
        }
    }

    #[test]
    fn placed_tasks_are_created_before_the_application_runs() {
        let spec = spec(AppKind::Container, 2, false);
        let current = status(Some(AppPhase::Scheduling));
        let f = facts(&spec, &current, false);
        let d = container_placed(&f, Ok(placement(&["edge-a", "edge-a"])));
        assert_eq!(phase_of(&d), Some(AppPhase::Running));
        assert_eq!(d.tasks.len(), 2);
        assert_eq!(d.tasks[1].spec.index, 1);
        assert_eq!(d.tasks[1].spec.args, vec!["1"]);
        assert_eq!(d.tasks[1].spec.max_attempts, 3);
        assert_eq!(d.tasks[0].region, "edge-a");
        assert_eq!(task_name("job", d.tasks[1].spec.index), "job-00001");
        let s = d.status.as_ref().unwrap();
        assert_eq!(s.progress.total, 2);
        assert_eq!(s.start_time.as_deref(), Some(NOW));
        assert_eq!(condition(s, "Scheduled").reason, "Scheduled");
        assert_eq!(d.events[0].message, "2 tasks on edge-a");
        assert_eq!(d.action, Action::Requeue(Duration::ZERO));
    }

    #[test]
    fn unschedulable_keeps_scheduling_and_warns_once() {
        let spec = spec(AppKind::Container, 2, false);
        let current = status(Some(AppPhase::Scheduling));
        let why = Unschedulable {
            reasons: vec!["edge-a: NotReady".into(), "hpc: tainted".into()],
        };
        let first = container_placed(&facts(&spec, &current, false), Err(why.clone()));
        let written = first.status.clone().unwrap();
        assert_eq!(written.phase, Some(AppPhase::Scheduling));
        let c = condition(&written, "Scheduled");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Unschedulable")
        );
        assert_eq!(c.message, "edge-a: NotReady; hpc: tainted");
        assert_eq!(reasons(&first), vec![(EventType::Warning, "Unschedulable")]);
        assert_eq!(first.action, Action::Requeue(POLL));
        assert!(first.tasks.is_empty());
        // The same reason on the next pass: no write, no second event.
        let again = container_placed(&facts(&spec, &written, false), Err(why));
        assert_eq!(again, ApplicationDecision::nothing(Action::Requeue(POLL)));
    }

    fn tally(total: u32, done: u32, dead: &[&str]) -> TaskTally {
        TaskTally {
            total,
            done,
            dead_lettered: dead.iter().map(|d| d.to_string()).collect(),
            energy_joules: 12.0,
        }
    }

    #[test]
    fn a_running_container_application_follows_its_tasks() {
        let spec = spec(AppKind::Container, 3, false);
        let mut current = status(Some(AppPhase::Running));
        current.progress.total = 3;
        let f = facts(&spec, &current, false);

        let d = container_running(&f, &tally(3, 1, &["job-00002"]));
        assert_eq!(phase_of(&d), Some(AppPhase::Failed));
        assert_eq!(reasons(&d), vec![(EventType::Warning, "TaskDeadLettered")]);
        assert_eq!(
            d.events[0].message,
            "tasks dead-lettered after their last attempt: job-00002"
        );
        let s = d.status.as_ref().unwrap();
        assert_eq!((s.progress.done, s.progress.failed), (1, 1));
        assert_eq!(condition(s, "Complete").status, "False");
        assert_eq!(s.completion_time.as_deref(), Some(NOW));
        assert_eq!(d.publish, None);

        let d = container_running(&f, &tally(3, 3, &[]));
        assert_eq!(phase_of(&d), Some(AppPhase::Succeeded));
        assert_eq!(d.publish, Some(Publish::TaskResults));
        assert_eq!(d.events[0].message, "3 tasks done, 12.0 J");
        let s = d.status.as_ref().unwrap();
        assert_eq!(condition(s, "Complete").message, "3 tasks done");
        assert_eq!(
            s.results.as_deref(),
            Some("/api/v1/applications/job/results")
        );
        assert_eq!(s.energy_joules, 12.0);
        assert_eq!(d.action, Action::AwaitChange);

        // Still running: progress written, no event; tasks still being created after a
        // restart are not done yet.
        for t in [tally(3, 2, &[]), tally(0, 0, &[])] {
            let d = container_running(&f, &t);
            assert_eq!(phase_of(&d), Some(AppPhase::Running));
            assert!(d.events.is_empty());
            assert_eq!(d.action, Action::Requeue(POLL));
        }
        // Nothing changed: nothing written.
        let mut seen = current.clone();
        seen.progress.done = 2;
        seen.energy_joules = 12.0;
        let d = container_running(&facts(&spec, &seen, false), &tally(3, 2, &[]));
        assert_eq!(d.status, None);
    }

    #[test]
    fn a_tally_counts_by_state() {
        let mut t = TaskTally::default();
        t.add("a", Some(TaskState::Done), 1.0);
        t.add("b", Some(TaskState::DeadLettered), 2.0);
        t.add("c", Some(TaskState::Leased), 0.5);
        t.add("d", None, 0.0);
        assert_eq!((t.total, t.done, t.energy_joules), (4, 1, 3.5));
        assert_eq!(t.dead_lettered, vec!["b"]);
    }

    #[test]
    fn conditions_move_their_transition_time_only_with_their_status() {
        let mut conditions = vec![];
        set_condition_at(&mut conditions, "Ready", false, "A", "a", "t1");
        set_condition_at(&mut conditions, "Ready", false, "B", "b", "t2");
        assert_eq!(
            (
                conditions[0].reason.as_str(),
                conditions[0].last_transition_time.as_str()
            ),
            ("B", "t1")
        );
        set_condition_at(&mut conditions, "Ready", true, "C", "c", "t3");
        assert_eq!(conditions[0].last_transition_time, "t3");
        assert_eq!(conditions.len(), 1);
    }

    fn region_spec(cpu: u32) -> RegionSpec {
        let spec = format!(
            r#"{{"tier": "edge", "driver": "local", "capacity": {{"cpu": {cpu}}},
                "energy": {{"idleWatts": 40.0, "wattsPerCore": 10.0}}}}"#
        );
        serde_json::from_str(&spec).unwrap()
    }

    fn seen(healthy: bool, workers: u32, cpu_seconds: f64) -> RegionObservation {
        RegionObservation {
            healthy,
            message: if healthy { "" } else { "worker exited" }.into(),
            workers,
            cpu_seconds,
        }
    }

    /// Seconds a task takes on a reference core, slower on slower regions: a predictor double.
    struct SecondsPerTask(f64);

    impl ceccm_scheduler::CostModel for SecondsPerTask {
        fn task_cost(
            &self,
            region: &ceccm_scheduler::RegionSnapshot,
            _group: &ceccm_scheduler::TaskGroup,
        ) -> ceccm_scheduler::TaskCost {
            ceccm_scheduler::TaskCost {
                seconds: self.0 / region.speed(),
                joules: 0.0,
            }
        }

        fn transfer_joules_per_byte(&self) -> f64 {
            0.0
        }
    }

    /// A region of `cores` cores with `queued` tasks waiting and `workers` up.
    fn pool(cores: f64, queued: u64, workers: u32) -> PoolFacts {
        let group = ceccm_scheduler::TaskGroup {
            name: "job".into(),
            tasks: 1,
            features: ceccm_scheduler::TaskFeatures {
                spectra: 100,
                pixels: 4563,
                templates: 150,
                moments: 2,
            },
            resources: ceccm_scheduler::Resources::new(1.0, 1024, 0),
            input: Default::default(),
            constraints: Default::default(),
            objective: ceccm_scheduler::Objective::Energy,
            deadline_s: None,
            parallelism: None,
            start_s: 0.0,
        };
        PoolFacts {
            region: ceccm_scheduler::RegionSnapshot::new(
                "edge",
                ceccm_scheduler::Tier::Edge,
                ceccm_scheduler::Resources::new(cores, 1 << 20, 0),
                ceccm_scheduler::EnergyProfile {
                    idle_watts: 40.0,
                    watts_per_core: 3.0,
                    pue: 1.2,
                    carbon_intensity: ceccm_scheduler::CarbonIntensity::Constant(200.0),
                },
                ceccm_scheduler::Network {
                    uplink_mbps: 100.0,
                    rtt_ms: 20.0,
                },
            ),
            queued: vec![(group, queued)],
            workers,
        }
    }

    fn tasks(queued: u32, leased: u32) -> RegionTasks {
        RegionTasks {
            queued,
            leased,
            cores_per_task: 1.0,
        }
    }

    #[test]
    fn a_region_runs_the_workers_its_predicted_queue_needs_until_deleted() {
        let step = |cpu: u32, t: RegionTasks, seconds: f64| {
            region_step(
                false,
                cpu,
                t,
                &pool(f64::from(cpu), u64::from(t.queued), t.leased),
                &SecondsPerTask(seconds),
            )
        };
        // Short tasks: 3 s of queued work drain within the target on one worker, beside the two
        // that run the leased tasks.
        assert_eq!(step(8, tasks(3, 2), 1.0), RegionStep::Ensure { workers: 3 });
        // Long ones: 300 s of work need five workers for 60 s, but there are only three tasks.
        assert_eq!(
            step(8, tasks(3, 2), 100.0),
            RegionStep::Ensure { workers: 5 }
        );
        // 100 tasks of 30 s need 50 workers: the region's cores cap them.
        assert_eq!(
            step(8, tasks(100, 0), 30.0),
            RegionStep::Ensure { workers: 8 }
        );
        assert_eq!(
            step(4, tasks(3, 2), 100.0),
            RegionStep::Ensure { workers: 4 }
        );
        // 20 tasks of 6 s: 120 s of work, two workers.
        assert_eq!(
            step(8, tasks(20, 0), 6.0),
            RegionStep::Ensure { workers: 2 }
        );
        // Nothing queued or leased: no worker at all.
        assert_eq!(step(8, tasks(0, 0), 6.0), RegionStep::Ensure { workers: 0 });
        // Only leased tasks: their workers, no more.
        assert_eq!(step(8, tasks(0, 3), 6.0), RegionStep::Ensure { workers: 3 });
        assert_eq!(
            region_step(true, 8, tasks(3, 2), &pool(8.0, 3, 2), &SecondsPerTask(1.0)),
            RegionStep::Release
        );
    }

    #[test]
    fn a_slower_region_gets_more_workers_for_the_same_queue() {
        let mut slow = pool(16.0, 20, 0);
        slow.region.cpu_speed = Some(0.5);
        let fast = pool(16.0, 20, 0);
        // 20 tasks of 6 s: 120 s of work here, 240 s on cores at half speed.
        let model = SecondsPerTask(6.0);
        assert_eq!(
            region_step(false, 16, tasks(20, 0), &fast, &model),
            RegionStep::Ensure { workers: 2 }
        );
        assert_eq!(
            region_step(false, 16, tasks(20, 0), &slow, &model),
            RegionStep::Ensure { workers: 4 }
        );
    }

    #[test]
    fn wide_tasks_take_as_many_cores_and_a_queue_always_gets_a_worker() {
        // Tasks of two threads each: a 4-core region runs two of them at once, a 1-core one
        // still runs one.
        let wide = RegionTasks {
            cores_per_task: 2.0,
            ..tasks(3, 2)
        };
        let model = SecondsPerTask(100.0);
        assert_eq!(
            region_step(false, 4, wide, &pool(4.0, 3, 2), &model),
            RegionStep::Ensure { workers: 2 }
        );
        assert_eq!(
            region_step(false, 1, wide, &pool(1.0, 3, 2), &model),
            RegionStep::Ensure { workers: 1 }
        );
        // A queue the predictor prices at nothing still gets one worker.
        assert_eq!(
            region_step(
                false,
                8,
                tasks(5, 0),
                &pool(8.0, 5, 0),
                &SecondsPerTask(0.0)
            ),
            RegionStep::Ensure { workers: 1 }
        );
    }

    #[test]
    fn region_health_follows_what_the_driver_saw() {
        let spec = region_spec(4);
        let fresh = RegionStatus::default();
        let facts = |status, leased, observed| RegionFacts {
            spec: &spec,
            status,
            tasks: RegionTasks {
                queued: 0,
                leased,
                ..RegionTasks::default()
            },
            observed,
            now_ms: NOW_MS,
        };
        // First sight, healthy: Ready, load and power from the leased tasks.
        let d = decide_region(&facts(&fresh, 2, Ok(seen(true, 2, 10.0))));
        let ready = d.status.clone().unwrap();
        assert_eq!(ready.phase.as_deref(), Some("Ready"));
        assert_eq!((ready.load, ready.power_watts), (0.5, 60.0));
        assert_eq!(ready.allocatable.as_ref().unwrap().cpu, 2);
        assert_eq!(ready.energy_joules, 100.0);
        assert_eq!(ready.heartbeat_time.as_deref(), Some(NOW));
        assert_eq!(d.event, Some(Event::normal("Ready", "2 workers")));
        assert_eq!(d.action, Action::Requeue(Duration::from_secs(1)));

        // Unchanged within the heartbeat: nothing written, no event.
        let d = decide_region(&facts(&ready, 2, Ok(seen(true, 2, 10.0))));
        assert_eq!((d.status, d.event), (None, None));
        // Unchanged but the heartbeat is due: rewritten, still no event.
        let mut old = ready.clone();
        old.heartbeat_time = Some(format_millis(NOW_MS - REGION_HEARTBEAT_MS));
        let d = decide_region(&facts(&old, 2, Ok(seen(true, 2, 10.0))));
        assert_eq!(d.status.unwrap().heartbeat_time.as_deref(), Some(NOW));
        assert_eq!(d.event, None);

        // The driver reports trouble, or cannot run the region at all: NotReady, one Warning.
        let d = decide_region(&facts(&ready, 0, Ok(seen(false, 0, 4.0))));
        let sick = d.status.unwrap();
        assert_eq!(sick.phase.as_deref(), Some("NotReady"));
        assert_eq!(sick.message.as_deref(), Some("worker exited"));
        // A restarted driver's counter does not take energy back.
        assert_eq!(sick.cpu_seconds, 10.0);
        assert_eq!(d.event, Some(Event::warning("NotReady", "worker exited")));
        let d = decide_region(&facts(
            &ready,
            0,
            Err("driver \"slurm\" is not available".into()),
        ));
        let silent = d.status.unwrap();
        assert_eq!(
            (silent.phase.as_deref(), silent.workers),
            (Some("NotReady"), 0)
        );
        assert_eq!(d.event.unwrap().kind, EventType::Warning);
        // The Ready condition says why and moved its transition time when the health changed.
        let ready_condition = &silent.conditions[0];
        assert_eq!(
            (
                ready_condition.condition_type.as_str(),
                ready_condition.status.as_str()
            ),
            ("Ready", "False")
        );
        assert_eq!(ready_condition.message, "driver \"slurm\" is not available");
        assert_eq!(not_ready_since(&silent), Some(NOW_MS));
        assert_eq!(not_ready_since(&ready), None);
    }

    #[test]
    fn an_agent_region_is_ready_while_its_agent_is_heard_within_the_grace() {
        assert!(
            agent_observation(None, NOW_MS, 40_000)
                .unwrap_err()
                .contains("no agent has joined")
        );
        let agent = AgentStatus {
            name: "site-1".into(),
            heartbeat_time: format_millis(NOW_MS - 40_000),
            cpu: 4,
            workers: 3,
            cpu_seconds: 12.5,
            measured_joules: None,
            connected_since: None,
        };
        let seen = agent_observation(Some(&agent), NOW_MS, 40_000).unwrap();
        assert_eq!(
            (seen.healthy, seen.workers, seen.cpu_seconds),
            (true, 3, 12.5)
        );
        assert_eq!(
            agent_observation(Some(&agent), NOW_MS + 1_000, 40_000),
            Err("agent site-1 not heard from for 41 s (grace 40 s)".into())
        );
        let garbled = AgentStatus {
            heartbeat_time: "yesterday".into(),
            ..agent
        };
        assert!(agent_observation(Some(&garbled), NOW_MS, 40_000).is_err());
    }

    #[test]
    fn a_lease_in_a_silent_agents_region_is_left_to_the_regions_toleration() {
        let agent = |heard: i64, since: i64| AgentStatus {
            name: "edge".into(),
            heartbeat_time: format_millis(heard),
            connected_since: Some(format_millis(since)),
            ..AgentStatus::default()
        };
        let deadline = NOW_MS - 5_000;
        // On the server's host the worker alone held it.
        assert!(worker_lost_lease(deadline, None, NOW_MS));
        // The agent was connected when the lease ran out: its worker failed.
        assert!(worker_lost_lease(
            deadline,
            Some(&agent(NOW_MS, deadline - 60_000)),
            NOW_MS
        ));
        // Not heard since the deadline: the link may be down; the toleration decides.
        assert!(!worker_lost_lease(
            deadline,
            Some(&agent(deadline - 1, deadline - 60_000)),
            NOW_MS
        ));
        // Just back: its workers get time to renew; later, a lease still not renewed failed.
        let back = NOW_MS - 1_000;
        assert!(!worker_lost_lease(
            deadline,
            Some(&agent(NOW_MS, back)),
            NOW_MS
        ));
        assert!(worker_lost_lease(
            deadline,
            Some(&agent(NOW_MS + RECONNECT_GRACE_MS, back)),
            back + RECONNECT_GRACE_MS
        ));
        // A gap longer than the reconnect gap starts a new connection.
        let old = agent(NOW_MS - 20_000, NOW_MS - 90_000);
        assert_eq!(connected_since(Some(&old), NOW_MS), NOW_MS);
        let recent = agent(NOW_MS - 2_000, NOW_MS - 90_000);
        assert_eq!(connected_since(Some(&recent), NOW_MS), NOW_MS - 90_000);
        assert_eq!(connected_since(None, NOW_MS), NOW_MS);
    }

    #[test]
    fn work_leaves_a_not_ready_region_only_past_its_toleration() {
        let since = NOW_MS - 5_000;
        assert_eq!(eviction_reason("edge", since, None, NOW_MS), None);
        assert_eq!(eviction_reason("edge", since, Some(6), NOW_MS), None);
        assert_eq!(
            eviction_reason("edge", since, Some(5), NOW_MS).as_deref(),
            Some("region edge NotReady for 5 s, beyond the application's toleration of 5 s")
        );
        assert!(eviction_reason("edge", since, Some(0), NOW_MS).is_some());
        // A clock that went backwards never evicts early.
        assert_eq!(
            eviction_reason("edge", NOW_MS + 9_000, Some(1), NOW_MS),
            None
        );
    }

    #[test]
    fn an_evicted_task_waits_unplaced_with_its_attempt_given_back() {
        let mut leased = on_lease(&queued_status(), "w1", 0, 1000).unwrap();
        leased.region = Some("edge".into());
        leased.lease_secret_sha256 = Some("abc".into());
        let evicted = on_evicted(&leased, "region edge drained").unwrap();
        assert_eq!(evicted.state, TaskState::Queued);
        assert_eq!((evicted.attempts, evicted.region.as_deref()), (0, None));
        assert_eq!(
            (&evicted.worker, &evicted.lease_secret_sha256),
            (&None, &None)
        );
        assert_eq!(evicted.evicted.as_deref(), Some("region edge drained"));
        let queued = on_evicted(&queued_status(), "x").unwrap();
        assert_eq!(queued.attempts, 0);
        for state in [TaskState::Done, TaskState::DeadLettered, TaskState::Failed] {
            assert_eq!(on_evicted(&task(state, 1), "x"), None, "{state:?}");
        }
    }

    #[test]
    fn lease_then_heartbeat_then_complete() {
        let leased = on_lease(&queued_status(), "w1", 1000, 5000).unwrap();
        assert_eq!(leased.state, TaskState::Leased);
        assert_eq!(leased.attempts, 1);
        assert_eq!(
            leased.lease_deadline.as_deref(),
            Some("1970-01-01T00:00:06.000Z")
        );
        assert_eq!(on_lease(&leased, "w2", 1000, 5000), Err(Refusal::NotQueued));
        let extended = on_heartbeat(&leased, "w1", 4000, 5000).unwrap();
        assert_eq!(
            extended.lease_deadline.as_deref(),
            Some("1970-01-01T00:00:09.000Z")
        );
        assert!(matches!(
            on_heartbeat(&leased, "w2", 4000, 5000),
            Err(Refusal::LeaseLost { .. })
        ));
        let outcome = |cpu_seconds, joules| Outcome {
            artifacts: vec![],
            cpu_seconds,
            joules,
        };
        let done = on_complete(&extended, "w1", outcome(1.5, 3.0), 9000).unwrap();
        assert_eq!(done.state, TaskState::Done);
        assert_eq!((done.cpu_seconds, done.energy_joules), (1.5, 3.0));
        assert_eq!(done.lease_deadline, None);
        assert_eq!(
            on_complete(&done, "w1", outcome(0.0, 0.0), 9001),
            Err(Refusal::Finished(TaskState::Done))
        );
    }

    #[test]
    fn failed_attempts_requeue_until_max_then_dead_letter() {
        let first = on_lease(&queued_status(), "w1", 0, 1000).unwrap();
        let requeued = on_attempt_failed(&first, 2, "boom".into(), 0.5, 1.0);
        assert_eq!(requeued.state, TaskState::Queued);
        assert_eq!(requeued.worker, None);
        let second = on_lease(&requeued, "w2", 0, 1000).unwrap();
        assert_eq!(second.attempts, 2);
        let dead = on_attempt_failed(&second, 2, "boom".into(), 0.5, 1.0);
        assert_eq!(dead.state, TaskState::DeadLettered);
        assert_eq!(dead.cpu_seconds, 1.0);
        assert_eq!(dead.error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_reported_failure_needs_the_lease_and_a_permanent_one_dead_letters() {
        let leased = on_lease(&queued_status(), "w1", 0, 1000).unwrap();
        assert!(matches!(
            on_fail(&leased, "w2", 3, false, "boom", 0.0, 0.0),
            Err(Refusal::LeaseLost { .. })
        ));
        let again = on_fail(&leased, "w1", 3, false, "boom", 0.0, 0.0).unwrap();
        assert_eq!(again.state, TaskState::Queued);
        let dead = on_fail(&leased, "w1", 3, true, "bad cube", 0.0, 0.0).unwrap();
        assert_eq!(dead.state, TaskState::DeadLettered);
        let long = "x".repeat(MAX_ERROR_CHARS + 10);
        let kept = on_fail(&leased, "w1", 3, false, &long, 0.0, 0.0).unwrap();
        assert_eq!(kept.error.unwrap().len(), MAX_ERROR_CHARS);
    }

    #[test]
    fn an_expired_lease_is_a_failed_attempt() {
        let leased = on_lease(&queued_status(), "w1", 0, 1000).unwrap();
        // Not yet past the deadline (a heartbeat may just have extended it).
        assert_eq!(on_lease_expired(&leased, 3, 1000), None);
        assert_eq!(on_lease_expired(&queued_status(), 3, 5000), None);
        let mut placed = leased.clone();
        placed.region = Some("edge".into());
        let requeued = on_lease_expired(&placed, 3, 1001).unwrap();
        assert_eq!(requeued.state, TaskState::Queued);
        // Placed again by the scheduler, not pinned to the region that lost it.
        assert_eq!(requeued.region, None);
        assert_eq!(
            requeued.error.as_deref(),
            Some("lease of worker w1 expired")
        );
        assert_eq!(
            lease_expired_event(&requeued),
            Event::warning("LeaseExpired", "lease of worker w1 expired")
        );
        let dead = on_lease_expired(&leased, 1, 1001).unwrap();
        assert_eq!(lease_expired_event(&dead).reason, "DeadLettered");
    }

    #[test]
    fn a_late_completion_by_a_previous_holder_still_counts_once() {
        let first = on_lease(&queued_status(), "w1", 0, 1000).unwrap();
        let expired = on_attempt_failed(&first, 3, "lease expired".into(), 0.0, 0.0);
        let second = on_lease(&expired, "w2", 2000, 1000).unwrap();
        let done = on_complete(&second, "w1", Outcome::default(), 2500).unwrap();
        assert_eq!(done.worker.as_deref(), Some("w1"));
        assert!(on_complete(&done, "w2", Outcome::default(), 2600).is_err());
    }

    fn task(state: TaskState, attempts: u32) -> TaskStatus {
        TaskStatus {
            state,
            attempts,
            worker: Some("w".into()),
            lease_deadline: Some("1970-01-01T00:00:01.000Z".into()),
            ..queued_status()
        }
    }

    #[test]
    fn cancel_withdraws_leases_and_keeps_finished_work() {
        let leased = cancelled_task(&task(TaskState::Leased, 1)).unwrap();
        assert_eq!((leased.state, leased.worker), (TaskState::Queued, None));
        assert!(cancelled_task(&task(TaskState::Done, 1)).is_none());
        assert!(cancelled_task(&task(TaskState::Queued, 0)).is_none());
        assert!(can_cancel(AppPhase::Running).is_ok());
        assert!(can_cancel(AppPhase::Succeeded).is_err());
        assert!(can_cancel(AppPhase::Cancelled).is_err());
        let mut s = status(Some(AppPhase::Running));
        cancelled(&mut s, NOW);
        assert_eq!(s.phase, Some(AppPhase::Cancelled));
        assert_eq!(condition(&s, "Complete").reason, "Cancelled");
    }

    #[test]
    fn retry_gives_dead_tasks_fresh_attempts() {
        let again = retried_task(&task(TaskState::DeadLettered, 3)).unwrap();
        assert_eq!((again.state, again.attempts), (TaskState::Queued, 0));
        assert!(retried_task(&task(TaskState::Done, 1)).is_none());
        assert!(can_retry(AppPhase::Failed).is_ok());
        assert!(can_retry(AppPhase::Cancelled).is_ok());
        assert!(can_retry(AppPhase::Running).is_err());
        let mut s = status(Some(AppPhase::Failed));
        cancelled(&mut s, NOW);
        retried(&mut s, true);
        assert_eq!(
            (s.phase, s.completion_time.clone()),
            (Some(AppPhase::Running), None)
        );
        assert!(s.conditions.is_empty());
        retried(&mut s, false);
        assert_eq!(s.phase, Some(AppPhase::Pending));
    }
}
